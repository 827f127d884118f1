"""The modern recipe against GPT-2's at the Wikipedia CPU scale, 2 seeds each, then lm-eval: docs/modern_cpu.md.

    SHARED_DATA_DIR=<mirror> python scripts/modern_cpu_study.py        # train (ablate.py), evaluate, summarise
    python scripts/modern_cpu_study.py --summary-only                  # the lm-eval tables of a finished study

Both recipes train config/wikipedia_cpu.py's body on data/wiki for the same tokens, in the same order, scored on
the same val rows: config/wikipedia_cpu.py (GPT-2's recipe) and config/wikipedia_modern_cpu.py (the ablation
table's modern recipe). ablate.py runs them (OUT/results.md: final val loss mean ± std, the difference ± its
standard error, token efficiency ± its standard error, curves); eval_lm.py then scores every final checkpoint
on LAMBADA and WikiText at max_length 512, and this script writes OUT/lm_eval.md: each run, each recipe's mean ±
std over seeds and modern - gpt2 ± its standard error (Welch, over seeds). Every step skips what exists, so a
rerun resumes. <mirror> holds corpus_wikipedia_en/ and the evaluation files (layout of tests/data).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "scripts"))

from reproduction_summary import COLUMNS, metric, summarize  # noqa: E402

from ablate import diff_se, mean_std  # noqa: E402
from errors import ArgumentParser, UserError, run_main  # noqa: E402

RECIPES = {"gpt2": "config/wikipedia_cpu.py", "modern": "config/wikipedia_modern_cpu.py"}
# 256 steps x 4,096 tokens = 1,048,576 tokens per run (config/wikipedia_cpu.py: 800); warmup 10 = its 3.75%
TRAIN_SETS = ["max_steps=256", "warmup_steps=10", "eval_interval=32", "ckpt_interval=64"]
TASKS = "lambada_openai,wikitext"
LM_COLUMNS = [c for c in COLUMNS if c[0] != "hellaswag"]


def run_name(recipe: str, seed: int) -> str:
    return f"{Path(RECIPES[recipe]).stem}_seed{seed}"  # ablate.py's folder for CONFIG@SEED


def recipe_table(out: Path, seeds: list[int]) -> str:
    """Per lm-eval metric: each recipe's mean ± std over seeds, and modern - gpt2 ± Welch's standard error."""
    values: dict[tuple[str, str], list[float]] = {}
    for recipe in RECIPES:
        for seed in seeds:
            path = out / "eval" / f"{run_name(recipe, seed)}_L512.json"
            if not path.is_file():
                raise UserError(f"{path} is missing: run the study (without --summary-only) first")
            results = json.loads(path.read_text())["results"]
            for task, name, title in LM_COLUMNS:
                m = metric(results, task, name)
                if m is not None:
                    values.setdefault((recipe, title), []).append(m[0])
    lines = ["| metric (max_length 512) | gpt2 recipe | modern recipe | modern − gpt2 ± SE |", "|---|---:|---:|---:|"]
    for _, _, title in LM_COLUMNS:
        a, b = values.get(("gpt2", title)), values.get(("modern", title))
        if not a or not b:
            continue
        (ma, sa), (mb, sb), se = mean_std(a), mean_std(b), diff_se(b, a)
        cells = [f"{m:.4f}" + (f" ± {s:.4f}" if s is not None else "") for m, s in ((ma, sa), (mb, sb))]
        cells.append(f"{mb - ma:+.4f}" + (f" ± {se:.4f}" if se is not None else ""))
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def call(argv: list[str], threads: str | None = None) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    if threads:
        env["OMP_NUM_THREADS"] = threads
    print("+ " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, *argv], cwd=REPO, env=env, check=True)


def study(out: Path, seeds: list[int], mirror: Path) -> None:
    if not (REPO / "data/wiki/meta.json").is_file():
        call(["prepare_data.py", "--files", str(mirror / "corpus_wikipedia_en/AA"), "--val-fraction", "0.01",
              "--out-dir", "data/wiki", "--wiki-title", "keep"])
    specs = [f"{RECIPES[r]}@{s}" for s in seeds for r in RECIPES]  # a seed's two recipes run side by side
    call(["ablate.py", *specs, "--out-dir", str(out), *(a for s in TRAIN_SETS for a in ("--set", s)),
          "--jobs", "2", "--threads", "1"])
    for seed in seeds:
        for recipe in RECIPES:
            run = run_name(recipe, seed)
            dest = out / "eval" / f"{run}_L512.json"
            if not dest.is_file():
                dest.parent.mkdir(parents=True, exist_ok=True)
                call(["eval_lm.py", str(out / run / "ckpt.pt"), "--data-dir", str(mirror), "--tasks", TASKS,
                      "--max-length", "512", "--batch-size", "16", "--device", "cpu", "--out", str(dest)])


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/modern_study", help="study folder (default out/modern_study)")
    p.add_argument("--seeds", default="1337,1338", help="comma-separated seeds (default 1337,1338)")
    p.add_argument("--summary-only", action="store_true", help="only write OUT/lm_eval.md from finished runs")
    args = p.parse_args(argv)
    out, seeds = Path(args.out), [int(s) for s in args.seeds.split(",")]
    if not args.summary_only:
        mirror = os.environ.get("SHARED_DATA_DIR")
        if not mirror or not (Path(mirror) / "corpus_wikipedia_en/AA").is_dir():
            raise UserError("set SHARED_DATA_DIR to the folder holding corpus_wikipedia_en/ and the evaluation files")
        study(out, seeds, Path(mirror))
    text = summarize(out) + "\n" + recipe_table(out, seeds)
    (out / "lm_eval.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    run_main(main)
