"""The seed-pipeline study (scripts/seed_rows_study.sh, docs/seed_pipeline.md) on tests/data: four arms x two
seeds, a few steps each, lm-eval --limit 3, the summary; then the study's promises: every arm's loss sees the
targets the script aimed at, and re-running a run's logged command reproduces its losses to the printed digit."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from seed_rows_study import ARM_ROWS, eot_split, same_losses, steps_for  # noqa: E402

from conftest import SAMPLE_DATA, hide_gpu  # noqa: E402
from monitor import read_metrics  # noqa: E402
from seed_rows import SeedRowLoader  # noqa: E402
from train_config import load_config  # noqa: E402

pytestmark = pytest.mark.e2e  # whole programs: the quick loop (-m "not e2e") leaves them out

ARMS = ("packed", "seed512", "seed512_nofilter", "packed_filtered")
ARM_ARGS = {"packed": [], "seed512": ["--rows=seed512"], "seed512_nofilter": ["--rows=seed512", "--seed_min_tokens=0"],
            "packed_filtered": ["--rows=packed_filtered"],
            "seed512_padloss": ["--rows=seed512", "--seed_loss_on_padding=true"]}  # on request (ARMS=...) only
SEEDS = (1337, 1338)


def _env(**kw: str) -> dict[str, str]:
    return hide_gpu({**os.environ, "PYTHON": sys.executable, "SHARED_DATA_DIR": str(SAMPLE_DATA), **kw})


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seed_rows_study") / "out"
    r = subprocess.run(["bash", str(REPO / "scripts" / "seed_rows_study.sh"), "--smoke"], cwd=REPO,
                       env=_env(OUT=str(out)), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def _launch_argv(run: Path) -> list[str]:
    return next(r["launch"]["argv"] for r in read_metrics(run) if "launch" in r)


def test_every_arm_of_the_script_has_a_summary_name_and_loads() -> None:
    """The shell script's arm_args, the summary's ARM_ROWS and ARM_ARGS above name the same arms with the same
    overrides, each of which load_config accepts; an unknown arm is refused."""
    script = (REPO / "scripts" / "seed_rows_study.sh").read_text()
    start = script.index("arm_args() {")
    func = script[start:script.index("\n}\n", start) + 3]
    assert set(ARM_ROWS) == set(ARM_ARGS)
    for arm, expect in ARM_ARGS.items():
        r = subprocess.run(["bash", "-c", f"{func}\narm_args {arm}"], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.split() == expect, (arm, r.stdout, r.stderr)
        cfg = load_config([str(REPO / "config" / "seed_rows_cpu.py"), *expect])
        assert cfg.rows == ("packed" if arm == "packed" else expect[0].split("=")[1])
        assert cfg.seed_loss_on_padding == (arm == "seed512_padloss")
        assert cfg.seed_min_tokens == (0 if arm == "seed512_nofilter" else 256)
    r = subprocess.run(["bash", "-c", f"{func}\narm_args seed1024"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown arm seed1024" in r.stderr


@pytest.mark.slow  # the whole study on samples: ~1.5 min on 2 shared cores
def test_study_runs_every_arm_and_summarizes(study: Path) -> None:
    for arm in ARMS:
        for seed in SEEDS:
            run = study / f"{arm}_s{seed}"
            argv = _launch_argv(run)
            assert f"--seed={seed}" in argv and all(a in argv for a in ARM_ARGS[arm]), argv
            if arm == "packed":
                assert not any(a.startswith("--rows=") for a in argv)
            losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
            assert losses and all(math.isfinite(v) for v in losses)
            res = json.loads((study / "eval" / f"{arm}_s{seed}_L512.json").read_text())
            assert res["max_length"] == 512 and res["limit"] == 3
            # --log-samples: per-item values, whose mean / ratio are lm-eval's aggregates
            lam = res["samples"]["lambada_openai_local"]
            assert len(lam) == 3
            ppl = math.exp(-np.mean([d["perplexity"] for d in lam]))
            assert ppl == pytest.approx(res["results"]["lambada_openai_local"]["perplexity,none"], rel=1e-9)
            wiki = res["samples"]["wikitext_local"]
            ll, words = sum(d["word_perplexity"][0] for d in wiki), sum(d["word_perplexity"][1] for d in wiki)
            assert math.exp(-ll / words) == pytest.approx(res["results"]["wikitext_local"]["word_perplexity,none"],
                                                          rel=1e-9)
    summary = (study / "summary.md").read_text()
    for arm in ARMS:
        for seed in SEEDS:
            assert f"| {arm}_s{seed} |" in summary
    rows = [line for line in summary.splitlines() if line.startswith("| seed512")]
    assert len(rows) == 4 + 2 and "Seed-to-seed spread of packed" in summary  # runs + Δ rows
    assert (study / "curves.png").stat().st_size > 10_000


@pytest.mark.slow  # needs the study's outputs
def test_steps_give_every_arm_the_aimed_loss_targets(study: Path) -> None:
    """steps_for's per-row mean against the loader's own count over one epoch (micro_batch 1: every row once)."""
    data = study / "data" / "wiki"
    base = [str(REPO / "config" / "seed_rows_cpu.py"), f"--data_dir={data}", "--micro_batch=1",
            "--total_batch_tokens=512"]
    for min_tokens in (256, 0):
        loader = SeedRowLoader(data, "train", 1, min_tokens=min_tokens, seed=1)
        n = loader.n_rows
        for _ in range(n):
            loader.next_batch()
        per_row = loader.loss_tokens / n
        target = 10 * 512
        expect = round(target / per_row)
        assert steps_for(target, base + ["--rows=seed512", f"--seed_min_tokens={min_tokens}"]) == expect
        assert per_row < 511  # short documents and tails: fewer targets than a packed row's 512
    assert steps_for(10 * 512, base) == 10 == steps_for(10 * 512, base + ["--rows=packed_filtered"])
    # the padding targets come on top of the real ones: padloss takes seed512's steps (and so its rows)
    seed = base + ["--rows=seed512"]
    assert steps_for(10 * 512, seed + ["--seed_loss_on_padding=true"]) == steps_for(10 * 512, seed)


@pytest.mark.slow  # reruns one of the study's runs (a few seconds)
def test_rerun_reproduces_losses_to_the_printed_digit(study: Path, tmp_path: Path) -> None:
    run = study / "seed512_s1337"
    argv = [a if not a.startswith("--out_dir=") else f"--out_dir={tmp_path / 'again'}" for a in _launch_argv(run)]
    r = subprocess.run([sys.executable, *argv], cwd=REPO, env=_env(OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    verdict = same_losses(run, tmp_path / "again")
    assert ": 0 differ at 4 decimals" in verdict, verdict
    # and the comparison can fail: one loss changed in its 4th decimal
    shutil.copytree(tmp_path / "again", tmp_path / "changed")
    lines = (tmp_path / "changed" / "metrics.jsonl").read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if '"loss"' in line)
    rec = json.loads(lines[i])
    rec["loss"] += 3e-4
    lines[i] = json.dumps(rec)
    (tmp_path / "changed" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert ": 1 differ at 4 decimals" in same_losses(run, tmp_path / "changed")


@pytest.mark.slow  # needs the study's outputs
def test_eot_split_recomputes_train_py_val_loss(study: Path) -> None:
    table = eot_split(study, list(ARMS), list(SEEDS))
    for arm in ARMS:
        for seed in SEEDS:
            row = next(line for line in table.splitlines() if line.startswith(f"| {arm}_s{seed} |"))
            val = [r["val_loss"] for r in read_metrics(study / f"{arm}_s{seed}") if "val_loss" in r][-1]
            cells = [c.strip() for c in row.split("|")[2:-1]]
            assert float(cells[0]) == pytest.approx(val, abs=1e-4)
            # the three parts' shares add up to the mean
            shares = [float(c.split("; ")[1].split(" of")[0]) for c in cells[1:]]
            assert sum(shares) == pytest.approx(val, abs=2e-4)
