"""report.py on a real train.py run (tiny model, CPU, one resume): every number in report.md is checked against
the run's metrics.jsonl read independently here, the evaluation table against the JSON the eval CLIs wrote,
the published GPT-2 figures against docs/evaluation.md, and the PNGs are decoded."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _shards import markov_dataset
from conftest import REPO, SAMPLE_DATA, shared_file
from model import GPT, GPTConfig
from test_train import TINY, args, run

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.e2e]

MODEL = {**TINY, "vocab_size": 50257, "block_size": 64}  # GPT-2's vocabulary: the eval CLIs read real text


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 steps, then resumed to 8 (two launches), with the HellaSwag hook; then both eval CLIs' --out files."""
    import eval_hellaswag
    import eval_lm

    root = tmp_path_factory.mktemp("report")
    data, out = markov_dataset(root / "data"), root / "run"
    hs = shared_file("hellaswag_val.jsonl")
    kw = dict(model_overrides=MODEL, log_interval=1, eval_interval=2, hellaswag_interval=4, hellaswag_limit=4,
              hellaswag_path=hs)
    run(args(data, out, **kw, max_steps=4))
    run(args(data, out, **kw, max_steps=8, init_from="resume"))
    eval_hellaswag.main([str(out / "ckpt.pt"), "--data", str(hs), "--limit", "6", "--device", "cpu",
                         "--out", str(out / "hellaswag.json")])
    eval_lm.main([str(out / "ckpt.pt"), "--tasks", "lambada_openai", "--data-dir", str(SAMPLE_DATA), "--limit", "4",
                  "--device", "cpu", "--bootstrap-iters", "0", "--out", str(out / "lm_eval.json")])
    r = cli(out)
    assert r.returncode == 0 and r.stdout.strip() == f"wrote {out / 'report.md'}", r.stderr
    return out


def cli(*argv: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "report.py"), *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def section_table(md: str, title: str) -> list[list[str]]:
    """The rows (cells stripped) of the first table under '## title'."""
    body = md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in body.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", ln.strip()[1:-1])] for ln in lines[2:]]


def test_summary_equals_metrics(run_dir: Path) -> None:
    recs = records(run_dir)
    train = [r for r in recs if "loss" in r]
    val = [r for r in recs if "val_loss" in r]
    summary = dict(section_table((run_dir / "report.md").read_text(), "Summary"))
    assert summary["steps done"] == "8" and [r["step"] for r in train] == list(range(8))
    assert summary["tokens seen"] == f"{8 * 128:,}" == f"{val[-1]['tokens']:,}"
    steady = [r["tok_per_s"] for r in train if r["step"] not in (0, 4)]  # each launch's first step: warm-up
    assert summary["median tokens/s"].startswith(f"{statistics.median(steady):,.0f} (median of 6 steps")
    assert summary["median MFU"].startswith("—")  # CPU: no peak FLOP/s
    assert summary["last train loss"] == f"{train[-1]['loss']:.4f} (step 7)"
    assert summary["last val loss"] == f"{val[-1]['val_loss']:.4f} (after 8 steps)"
    best = min(val, key=lambda r: r["val_loss"])
    assert summary["best val loss"] == f"{best['val_loss']:.4f} (after {best['step']} steps)"
    # wall time: each launch from its launch record to the last record before the next one
    starts = [i for i, r in enumerate(recs) if "launch" in r]
    assert [recs[i]["step"] for i in starts] == [0, 4]
    ends = [*starts[1:], len(recs)]
    wall = sum(recs[e - 1]["time"] - recs[s]["time"] for s, e in zip(starts, ends))
    assert wall > 0 and summary["wall time"].startswith(f"{round(wall)} s (2 launches")


def test_command_config_and_machine(run_dir: Path) -> None:
    md = (run_dir / "report.md").read_text()
    launches = section_table(md, "Command and machine")
    assert [row[2] for row in launches] == ["0", "4"]
    assert "--max_steps=4" in launches[0][3] and "--init_from=resume" in launches[1][3]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for row in launches:
        assert row[3].startswith("`") and "train.py" in row[3]
        assert f"torch {torch.__version__}" in row[4] and f"({cores} cores)" in row[4] and "1 process" in row[4]
    config = {row[0].strip("`"): row[1].strip("`") for row in section_table(md, "Config")}
    assert config["max_steps"] == "8" and config["init_from"] == '"resume"' and config["hellaswag_limit"] == "4"
    assert "warmup_steps" in config and "beta1" not in config  # only what differs from TrainConfig's defaults
    n = GPT(GPTConfig.from_preset("gpt2", **MODEL)).num_params()
    assert f"Model: 2 layers, 2 heads, n_embd 32, block_size 64, vocab 50257: {n:,} parameters." in md


def test_evaluation_table_equals_the_eval_files(run_dir: Path) -> None:
    rows = section_table((run_dir / "report.md").read_text(), "Evaluation")
    by = {(r[0], r[1], r[2]): r for r in rows}
    hs = json.loads((run_dir / "hellaswag.json").read_text())
    row = by["hellaswag.json", "hellaswag", "acc_norm"]
    assert row[3:6] == [f"{hs['acc_norm']:.4f} ± {hs['acc_norm_stderr']:.4f}", "6", "64"]
    assert row[6] == "0.3114" and "llm.c" in row[7]  # published, with its source
    assert by["hellaswag.json", "hellaswag", "llmc_acc_norm"][3] == f"{hs['llmc_acc_norm']:.4f}"
    lm = json.loads((run_dir / "lm_eval.json").read_text())
    lam = lm["results"]["lambada_openai_local"]
    row = by["lm_eval.json", "lambada_openai_local", "perplexity"]
    assert row[3:7] == [f"{lam['perplexity,none']:.2f}", "4", "64", "40.0554"] and "#2159" in row[7]
    assert by["lm_eval.json", "lambada_openai_local", "acc"][3] == f"{lam['acc,none']:.4f}"
    hook = [r for r in records(run_dir) if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in hook] == [4, 8]  # the training hook ran at block_size 64 < its default 512
    row = by["metrics.jsonl (step 8)", "hellaswag", "acc_norm"]
    assert row[3:6] == [f"{hook[-1]['hellaswag_acc_norm']:.4f}", "4", "64"]


def test_pngs_are_images_of_the_curves(run_dir: Path) -> None:
    import matplotlib.image

    md = (run_dir / "report.md").read_text()
    names = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert names == ["loss.png", "throughput.png"]
    for name in names:
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(run_dir / name)
        assert img.shape[0] > 200 and img.shape[1] > 400 and img.std() > 0.01  # decodes, and is not blank


def test_published_numbers_are_the_docs(run_dir: Path) -> None:
    """report.py's GPT-2 124M figures are the ones docs/evaluation.md's table cites, from the sources it names."""
    from report import GPT2_124M_PUBLISHED

    docs = (REPO / "docs" / "evaluation.md").read_text()
    rows = [ln for ln in docs.splitlines() if ln.startswith("| ")]
    for (task, metric), (value, _, source) in GPT2_124M_PUBLISHED.items():
        shown = f"{100 * value:.2f}" if task == "hellaswag" else f"{value:g}"  # the docs give HellaSwag in %
        ref = re.search(r"#\d+|dev/data/hellaswag\.py", source).group(0)
        assert any(ln.startswith(f"| {task}") and shown in ln for ln in rows) and ref in docs, (task, metric)


def test_run_without_launch_records(run_dir: Path, tmp_path: Path) -> None:
    """A run logged before launch records existed: the config comes from ckpt.pt, the rest says 'not recorded'."""
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(run_dir / "ckpt.pt", old / "ckpt.pt")
    recs = [{k: v for k, v in r.items() if k != "time"} for r in records(run_dir) if "launch" not in r]
    (old / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    r = cli(old)
    assert r.returncode == 0, r.stderr
    md = (old / "report.md").read_text()
    assert "predates launch records" in md and "The config below is the checkpoint's" in md
    summary = dict(section_table(md, "Summary"))
    assert summary["wall time"].startswith("not recorded") and summary["tokens seen"] == "1,024"
    assert "## Evaluation" in md and "| `max_steps` | `8` |" in md


def test_bad_input_is_one_line_exit_2(run_dir: Path, tmp_path: Path) -> None:
    empty, bad, launch_only = tmp_path / "empty", tmp_path / "bad", tmp_path / "launch_only"
    for d in (empty, bad, launch_only):
        d.mkdir()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (bad / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2] + "\n" + lines[2] + "\n")
    (launch_only / "metrics.jsonl").write_text(lines[0] + "\n")
    cases = {
        empty: "has no metrics.jsonl",
        tmp_path / "missing": "is not a folder",
        run_dir / "report.md": "is not a folder",
        bad: "metrics.jsonl:2: not a metrics record",  # (a torn last line is dropped: tests/test_checkpoints.py)
        launch_only: "holds no train or val records",
    }
    for folder, expected in cases.items():
        r = cli(folder)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error:") and expected in err[0], r.stderr
    assert not (empty / "report.md").exists() and not list(bad.glob("*.png"))
