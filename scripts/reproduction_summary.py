"""Summarise a scripts/reproduce_cpu.sh output folder as Markdown: final val loss per run, the lm-eval table
(value ± lm-eval's stderr) per run and context length, and doc_mask - baseline per seed.

    python scripts/reproduction_summary.py out/reproduction_cpu > summary.md
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from errors import ArgumentParser, UserError, run_main  # noqa: E402
from monitor import read_metrics  # noqa: E402

# (task, metric, column title); tasks are looked up with or without eval_lm's "_local" suffix
COLUMNS = [
    ("hellaswag", "acc", "hellaswag acc"),
    ("hellaswag", "acc_norm", "hellaswag acc_norm"),
    ("lambada_openai", "acc", "lambada acc"),
    ("lambada_openai", "perplexity", "lambada ppl"),
    ("wikitext", "word_perplexity", "wikitext word_ppl"),
    ("wikitext", "bits_per_byte", "wikitext bits/byte"),  # comparable with in-domain val loss per byte
]


def metric(results: dict, task: str, name: str) -> tuple[float, float | None] | None:
    """(value, stderr or None) of lm-eval's `name,none` for task or task_local; None when not evaluated."""
    res = results.get(task) or results.get(f"{task}_local")
    if res is None or f"{name},none" not in res:
        return None
    err = res.get(f"{name}_stderr,none")
    return float(res[f"{name},none"]), (float(err) if isinstance(err, (int, float)) else None)


def fmt(m: tuple[float, float | None] | None) -> str:
    if m is None:
        return "—"
    v, e = m
    return f"{v:.4f} ± {e:.4f}" if e is not None and math.isfinite(e) else f"{v:.4f}"


def final_val_loss(run_dir: Path) -> float | None:
    """The run's last logged val loss; None for a folder without metrics.jsonl (the init checkpoints)."""
    if not (run_dir / "metrics.jsonl").is_file():
        return None
    vals = [r["val_loss"] for r in read_metrics(run_dir) if r.get("val_loss") is not None]
    return vals[-1] if vals else None


def summarize(out: Path) -> str:
    evals = sorted((out / "eval").glob("*_L*.json")) if (out / "eval").is_dir() else []
    if not evals:
        raise UserError(f"no eval/*_L<len>.json under {out}; run scripts/reproduce_cpu.sh first")
    rows: dict[tuple[str, int], dict] = {}
    limits: dict[str, set] = {}  # task -> the --limit values it was evaluated with
    for p in evals:
        # <run>_L<len>.json, or a part of it: <run>_L<len>_<part>.json (e.g. hellaswag with its own limit)
        m = re.fullmatch(r"(.+)_L(\d+)(?:_[a-z_]+)?\.json", p.name)
        if not m:
            continue
        data = json.loads(p.read_text())
        rows.setdefault((m.group(1), int(m.group(2))), {}).update(data["results"])
        for task in data["results"]:
            limits.setdefault(task.removesuffix("_local"), set()).add(data.get("limit"))
    limit_text = "; ".join(f"{t}: {', '.join(map(str, sorted(v, key=str)))}" for t, v in sorted(limits.items()))
    lines = [f"# {out}", "", f"lm-eval --limit per task (None: the whole task): {limit_text}", "",
             "| run | max_length | final val loss | " + " | ".join(c[2] for c in COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    for (run, length), res in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        vl = final_val_loss(out / run)
        lines.append(f"| {run} | {length} | {'—' if vl is None else f'{vl:.4f}'} | "
                     + " | ".join(fmt(metric(res, t, n)) for t, n, _ in COLUMNS) + " |")
    # doc_mask - baseline, per seed and context length (same data, tokens and seed)
    diff_lines = []
    for (run, length), res in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if not run.startswith("doc_mask_"):
            continue
        base = rows.get(("baseline_" + run.removeprefix("doc_mask_"), length))
        if base is None:
            continue
        cells = []
        for t, n, _ in COLUMNS:
            a, b = metric(res, t, n), metric(base, t, n)
            if a is None or b is None:
                cells.append("—")
                continue
            # stderr of a difference of two independent estimates on the same examples is at most this
            err = math.hypot(a[1], b[1]) if a[1] is not None and b[1] is not None else None
            cells.append(fmt((a[0] - b[0], err)))
        diff_lines.append(f"| {run.removeprefix('doc_mask_')} | {length} | " + " | ".join(cells) + " |")
    if diff_lines:
        lines += ["", "doc_mask − baseline (± sqrt(se_a² + se_b²), an upper bound: both score the same examples)", "",
                  "| seed | max_length | " + " | ".join(c[2] for c in COLUMNS) + " |",
                  "|---|---|" + "---|" * len(COLUMNS)] + diff_lines
    return "\n".join(lines) + "\n"


def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the OUT folder of scripts/reproduce_cpu.sh")
    a = p.parse_args()
    print(summarize(Path(a.out)), end="")


if __name__ == "__main__":
    run_main(main)
