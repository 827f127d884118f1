"""Reading the Markdown tables the study scripts print (scripts/reproduction_summary.py, scripts/seed_rows_study.py)."""

from __future__ import annotations


def md_rows(text: str, first: str) -> list[dict[str, str]]:
    """The rows of the Markdown table in `text` whose header starts with `| first |`, as {column title: cell}."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(f"| {first} |"))
    titles = [c.strip() for c in lines[i].split("|")[1:-1]]
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(titles, (c.strip() for c in line.split("|")[1:-1]), strict=True)))
    return rows


def printed(cell: str) -> tuple[float, float | None]:
    """A table cell "value ± stderr" or "value" (thousands commas allowed) as numbers."""
    v, _, e = cell.replace(",", "").partition(" ± ")
    return float(v), (float(e) if e else None)
