"""ablate.py: the sweep runner. References: train.py run directly with the same arguments (what the sweep's
numbers must equal), metrics.jsonl read independently here, and an uninterrupted sweep (for resume)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ablate
from _shards import markov_dataset
from checkpoint import load_checkpoint, model_from_checkpoint
from conftest import hide_gpu
from errors import UserError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = [str(REPO / "config/ablations/baseline.py"), str(REPO / "config/ablations/rope.py")]
# The real ablation configs, shrunk: a 64-token vocabulary (the Markov data's), one layer, a few steps.
TINY = ["model_overrides.vocab_size=64", "model_overrides.n_layer=1", "model_overrides.n_embd=32",
        "model_overrides.n_head=2", "micro_batch=4", "seq_len=16", "total_batch_tokens=64", "max_steps=6",
        "warmup_steps=2", "eval_interval=3", "eval_tokens=64", "log_interval=1", "device=cpu"]


def env() -> dict:  # the GPU hidden: ablate.py's HellaSwag column evaluates on CUDA where it sees one
    return hide_gpu({**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                     "WANDB_MODE": "disabled"})


def sweep_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "ablate.py"), *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [*CONFIGS, "--out-dir", str(out), "--data-dir", str(data), *[f"--set={s}" for s in TINY], *extra]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def losses(run_dir: Path) -> tuple[list, list]:
    recs = records(run_dir)
    return ([(r["step"], r["loss"]) for r in recs if "loss" in r],
            [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r])


def table(md: Path) -> dict[str, dict[str, str]]:
    lines = [ln for ln in md.read_text().splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return {row[0]: dict(zip(head, row)) for row in
            ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return markov_dataset(tmp_path_factory.mktemp("abl") / "data")


@pytest.fixture(scope="module")
def swept(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    r = sweep_cli(*tiny_args(data, out))
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_table_numbers_are_the_runs_metrics(swept, data, tmp_path):
    """Every cell of results.md is the run's metrics.jsonl / checkpoint, and each run equals train.py run
    by hand with the same config and overrides (same data, tokens, seed)."""
    rows = table(swept / "results.md")
    assert list(rows) == ["baseline", "rope"]
    for name in rows:
        recs, row = records(swept / name), rows[name]
        train = [r for r in recs if "loss" in r]
        final_val = [r["val_loss"] for r in recs if r.get("val_loss") is not None and r["step"] == 6]
        assert len(final_val) == 1 and train[-1]["step"] == 5
        assert row["final val loss"] == f"{final_val[0]:.4f}"
        assert row["final train loss"] == f"{train[-1]['loss']:.4f}"
        assert row["tokens/s"] == f"{statistics.median(r['tok_per_s'] for r in train if r['step'] > 0):,.0f}"
        params = model_from_checkpoint(load_checkpoint(swept / name / "ckpt.pt")).num_params()
        assert row["params"] == f"{params:,}" and row["status"] == "ok"
    base = float(rows["baseline"]["final val loss"])
    assert rows["rope"]["Δ val vs baseline"] == f"{float(rows['rope']['final val loss']) - base:+.4f}"
    # the reference: train.py by hand
    ref = tmp_path / "ref"
    r = subprocess.run([sys.executable, str(REPO / "train.py"), CONFIGS[1], *[f"--{s}" for s in TINY],
                        f"--data_dir={data}", f"--out_dir={ref}"], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert losses(ref) == losses(swept / "rope")  # bit for bit (fp32 on CPU)
    assert losses(swept / "rope") != losses(swept / "baseline")  # the variants really differ
    png = (swept / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_rerun_skips_finished_runs(swept, data):
    before = {p: p.stat().st_mtime_ns for p in swept.glob("*/*") if p.name in ("ckpt.pt", "metrics.jsonl")}
    old = table(swept / "results.md")
    r = sweep_cli(*tiny_args(data, swept))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("finished earlier, skipped") == 2 and "training" not in r.stdout
    assert before == {p: p.stat().st_mtime_ns for p in before} and len(before) == 4
    new = table(swept / "results.md")
    for name in old:
        for col in ("params", "final train loss", "final val loss", "tokens/s"):
            assert new[name][col] == old[name][col]


def base_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [a for a in tiny_args(data, out, *extra) if a != CONFIGS[1]]  # the baseline alone


def test_changed_settings_rerun_from_scratch(swept, data, tmp_path):
    """A finished run is reused only for the same resolved TrainConfig: with another lr, the copied finished
    run is trained again from scratch (its old metrics replaced), not skipped."""
    out = tmp_path / "changed"
    shutil.copytree(swept / "baseline", out / "baseline")
    r = sweep_cli(*base_args(data, out, "--set=lr=1e-3"))
    assert r.returncode == 0 and "training" in r.stdout and "skipped" not in r.stdout, r.stdout
    new, old = losses(out / "baseline"), losses(swept / "baseline")
    assert [s for s, _ in new[0]] == [s for s, _ in old[0]] and new != old
    assert new[0][0] == old[0][0]  # step 0's loss (before any update) is the same model and batch


@pytest.mark.slow
def test_interrupted_sweep_resumes_to_the_uninterrupted_result(data, tmp_path):
    """SIGTERM to the sweep reaches the training child, which checkpoints; the same command then resumes it
    (init_from=resume) and the curves equal an uninterrupted sweep's, bit for bit."""
    long = ("--set=max_steps=1000", "--set=eval_interval=500")  # ~10 s: time to interrupt
    ref, out = tmp_path / "ref", tmp_path / "int"
    full = sweep_cli(*base_args(data, ref, *long))
    assert full.returncode == 0, full.stdout + full.stderr
    p = subprocess.Popen([sys.executable, str(REPO / "ablate.py"), *base_args(data, out, *long)], cwd=REPO,
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "baseline" / "train.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and re.search(r"step [1-9]\d*/1000", log.read_text())):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 1 and "rerun the same command" in stderr, stdout + stderr
    stopped_at = load_checkpoint(out / "baseline" / "ckpt.pt")["step"]
    assert 0 < stopped_at < 1000
    assert "stopped" in table(out / "results.md")["baseline"]["status"]
    r = sweep_cli(*base_args(data, out, *long))
    assert r.returncode == 0 and "resuming" in r.stdout, r.stdout + r.stderr
    assert losses(out / "baseline") == losses(ref / "baseline")
    assert table(out / "results.md")["baseline"]["status"] == "ok (resumed)"


@pytest.mark.slow
def test_hellaswag_column(data, tmp_path):
    """The acc_norm cell is eval_hellaswag.evaluate_hellaswag on the final checkpoint (a real-vocab model)."""
    from conftest import shared_file

    hs = shared_file("hellaswag_val.jsonl")
    import torch

    from eval_hellaswag import evaluate_hellaswag

    out = tmp_path / "hs"
    r = sweep_cli(*base_args(data, out, "--hellaswag-limit=3", f"--hellaswag-data={hs}",
                             "--set=model_overrides.vocab_size=50257"))
    assert r.returncode == 0, r.stderr
    model = model_from_checkpoint(load_checkpoint(out / "baseline" / "ckpt.pt")).eval()
    with torch.no_grad():
        want = evaluate_hellaswag(model, data_path=hs, limit=3, max_length=model.config.block_size)["acc_norm"]
    assert table(out / "results.md")["baseline"]["HellaSwag acc_norm"] == f"{want:.4f}"


def test_bad_input_on_the_command_line_is_one_line_exit_2(tmp_path):
    r = sweep_cli("config/ablations/nope_typo.py", "--out-dir", str(tmp_path), timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: config file config/ablations/nope_typo.py does not exist"], r.stderr
    r = sweep_cli(CONFIGS[0], "--set", "max_steps", timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "KEY=VALUE" in r.stderr
    assert not list(tmp_path.iterdir())  # nothing trained


@pytest.mark.parametrize("args,match", [
    ([CONFIGS[0], "--set", "lrr=1"], "unknown key"),
    ([CONFIGS[0], "--data-dir", "/nonexistent/data"], "/nonexistent/data"),
    ([CONFIGS[0] + "@x"], "integer seed"),
    ([CONFIGS[0], "--set", "eval_interval=0"], "eval_interval=0"),
    ([CONFIGS[0], CONFIGS[0]], "given twice"),
    ([CONFIGS[0], "--hellaswag-limit", "2", "--hellaswag-data", "/nonexistent.jsonl"], "does not exist"),
])
def test_bad_input_is_a_user_error(args, match, data, tmp_path):
    with pytest.raises(UserError, match=match) as e:
        ablate.main([*args, *([] if "--data-dir" in args else ["--data-dir", str(data)]), "--out-dir", str(tmp_path)])
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("*/ckpt.pt"))


def test_runs_that_differ_in_budget_are_refused(data, tmp_path):
    other = tmp_path / "longer.py"
    other.write_text(f"exec(open({str(REPO / 'config/ablations/baseline.py')!r}).read())\nmax_steps = 200\n")
    with pytest.raises(UserError, match="runs differ in max_steps"):
        ablate.plan([CONFIGS[0], str(other)], tmp_path, [], None, str(data))


def test_preset_is_every_ablation_config_plus_a_second_baseline_seed():
    configs, out = ablate.preset_configs("cpu")
    files = sorted(p.stem for p in (REPO / "config/ablations").glob("*.py"))
    assert Path(configs[0]).stem == "baseline" and configs[1].endswith("baseline.py@1338")
    assert sorted(Path(c.split("@")[0]).stem for c in configs if "@" not in c) == files
    assert out == Path("out/ablations_cpu")


def test_runs_from_before_a_new_train_option_still_count_as_finished():
    """A field added to TrainConfig after a run was saved matches only while it stays at its default."""
    from dataclasses import asdict

    import train_config

    wanted = asdict(train_config.load_config([CONFIGS[0]]))
    saved = {k: v for k, v in wanted.items() if k != "hellaswag_limit"}  # as if the field were new
    assert ablate.same_config(saved, wanted)
    assert not ablate.same_config(saved, {**wanted, "hellaswag_limit": 7})
    assert not ablate.same_config({**wanted, "lr": 1.0}, wanted)
    assert ablate.same_config({**wanted, "init_from": "scratch"}, {**wanted, "init_from": "resume"})
