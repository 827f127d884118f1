"""Reading Markdown: the tables the study scripts print (scripts/reproduction_summary.py, scripts/seed_rows_study.py),
and the code blocks and code spans of the docs (tests/test_docs_truth.py)."""

from __future__ import annotations

import re


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


_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")


def unquoted(text: str) -> list[str]:
    """The lines of a Markdown file with any blockquote marker ("> ") taken off; the line count stays."""
    return [re.sub(r"^(?:\s*>(?: |$))+", "", line) for line in text.splitlines()]


def fenced_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """Each fenced code block (``` or ~~~, in a blockquote too): (the 1-based line number of its first content
    line, its info string's language ("" if none), its content lines)."""
    blocks, lines, i = [], unquoted(text), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, end = m.group(1), i + 1
        while end < len(lines) and not re.match(rf"^\s*{fence[0]}{{{len(fence)},}}\s*$", lines[end]):
            end += 1
        blocks.append((i + 2, m.group(2), lines[i + 1:end]))
        i = end + 1
    return blocks


def code_spans(text: str) -> list[tuple[int, str]]:
    """Each inline code span (`...`, ``...``) outside the fenced blocks: (the 1-based line number where it
    opens, its text). A span may run over a line break (not over a blank line); the newline stays in its text."""
    lines = unquoted(text)
    for first, _, content in fenced_blocks(text):  # blank out the fenced blocks, keeping the line numbers
        for j in range(first - 2, first - 1 + len(content) + 1):
            if j < len(lines):
                lines[j] = ""
    prose = "\n".join(lines)
    span = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.S)
    return [(prose.count("\n", 0, m.start()) + 1, m.group(2)) for m in span.finditer(prose)]
