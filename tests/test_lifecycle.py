"""The training run's lifecycle on real train.py / torchrun processes (tiny model, CPU, the markov data set):
what happens at which step with the shipped configs' intervals (log_interval 10), and around the end of a run,
a stop request, a restart, --overwrite and a divergence. Each interval counts optimizer steps on its own: a
checkpoint or an evaluation never waits for a log step. References are runs nobody interrupted."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _shards import markov_dataset
from checkpoint import load_checkpoint
from test_faults import TORCHRUN, finish, kill_when, start
from test_train import RESUME, args, assert_identical, ckpt, env, metrics, run

pytestmark = pytest.mark.e2e  # whole programs: the quick loop (-m "not e2e") leaves them out

REPO = Path(__file__).resolve().parent.parent
SLOW = {"slow": {"step_s": 0.2}}  # tests/fault_launcher.py: "slow: step k" and 0.2 s at the start of every step


def signal_in_step_after(p: subprocess.Popen, line: str, step: int, sig: int) -> str:
    """Send `sig` at the start of optimizer step `step` (the fault launcher's "slow: step k" line), the step after
    the one whose sync printed `line`: the signal then lands inside that step, after the sync's stop check (a
    signal sent the moment `line` appears could still reach that check). Returns all output."""
    return kill_when(p, f"slow: step {step}\n", sig, after=line)


TWO = ["--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return markov_dataset(tmp_path_factory.mktemp("markov") / "data")


def records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def step_lines(log: str, max_steps: int) -> list[int]:
    """The steps of the training log lines ("step N/max_steps | loss ...") in `log`."""
    return [int(m) for m in re.findall(rf"^step (\d+)/{max_steps} \|", log, re.MULTILINE)]


def errors(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if ln.startswith("error:")]


def train_py(argv: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    """train.py with argv, any exit code, stdout and stderr apart."""
    return subprocess.run([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------------
# cadence: every interval on its own


@pytest.fixture(scope="module")
def cadence(data, tmp_path_factory) -> tuple[Path, str]:
    """One 25-step run: log 10, checkpoints every 10 (3 kept), val loss every 4."""
    out = tmp_path_factory.mktemp("cadence") / "out"
    r = run(args(data, out, max_steps=25, log_interval=10, ckpt_interval=10, keep_checkpoints=3, eval_interval=4))
    return out, r.stdout


def test_checkpoints_and_evaluations_do_not_wait_for_log_steps(cadence):
    """ckpt_interval=10 with log_interval=10 saves at steps 10, 20 and the end (25); eval_interval=4 evaluates at
    every multiple of 4 and the end."""
    out, log = cadence
    for step in (10, 20, 25):
        assert load_checkpoint(out / f"ckpt_{step:08d}.pt")["step"] == step, log
        assert f"saved checkpoint {out / 'ckpt.pt'} at step {step} in" in log, log
    assert load_checkpoint(out / "ckpt.pt")["step"] == 25
    assert [s for s, _ in metrics(out)[1]] == [0, 4, 8, 12, 16, 20, 24, 25], log


def test_every_step_reaches_metrics_jsonl(cadence):
    """log_interval=10 prints steps 0, 10, 20 and the last (24), while metrics.jsonl records every step's loss,
    grad norm, lr, tokens and speed."""
    out, log = cadence
    assert step_lines(log, 25) == [0, 10, 20, 24], log
    recs = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in recs] == list(range(25))
    for r in recs:
        assert {"loss", "grad_norm", "lr", "tokens", "tok_per_s", "step_ms"} <= set(r), r
        assert r["tokens"] == (r["step"] + 1) * 128, r


# ----------------------------------------------------------------------------------------------------
# the end of a run


HS_MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 32, "vocab_size": 50257, "block_size": 64}  # GPT-2's vocabulary:
# HellaSwag scores real text (the markov tokens are < 64, so the same data trains it)


def test_final_checkpoint_comes_before_final_evaluations_and_resume_runs_only_missing_ones(data, tmp_path):
    """SIGKILL during the final evaluations (after the final val loss, during HellaSwag) leaves the final
    checkpoint; init_from=auto then trains nothing and runs only the HellaSwag evaluation metrics.jsonl lacks.
    (The fault launcher makes each HellaSwag forward pass sleep 2 s, so the kill lands inside it.)"""
    from conftest import shared_file

    out = tmp_path / "end"
    argv = args(data, out, model_overrides=HS_MODEL, max_steps=15, log_interval=10, eval_interval=5,
                hellaswag_interval=1000, hellaswag_path=shared_file("hellaswag_val.jsonl"), hellaswag_limit=4)
    p = start(argv, {"slow": {"hellaswag_s": 2}})
    log = kill_when(p, "step 15: val loss", signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    assert (out / "ckpt.pt").is_file() and ckpt(out)["step"] == 15, log
    assert "hellaswag acc_norm" not in log, log  # the kill came before the HellaSwag result
    r = run(argv + ["--init_from=auto"])
    assert step_lines(r.stdout, 15) == [] and "val loss" not in r.stdout, r.stdout
    assert "step 15: hellaswag acc_norm" in r.stdout, r.stdout
    recs = records(out)
    assert [r["step"] for r in recs if "val_loss" in r and r["step"] == 15] == [15], recs
    assert [r["step"] for r in recs if "hellaswag_acc_norm" in r and r["step"] == 15] == [15], recs


def test_missing_hellaswag_file_fails_at_start(data, tmp_path):
    """A HellaSwag file that does not exist stops the run before its first step: one error line naming it, exit
    2, no checkpoint; under torchrun 2 processes too, with one error line in all."""
    missing = tmp_path / "no_such_hellaswag.jsonl"
    out = tmp_path / "one"
    argv = args(data, out, max_steps=6, log_interval=10, hellaswag_interval=1000, hellaswag_path=missing)
    r = train_py(argv)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert not re.search(r"^step 0/", r.stdout, re.MULTILINE), r.stdout
    err = errors(r.stderr)
    assert len(err) == 1 and str(missing) in err[0], r.stderr
    assert not list(out.glob("ckpt*.pt"))
    out2 = tmp_path / "two"
    code, log, _ = finish(start(args(data, out2, max_steps=6, log_interval=10, hellaswag_interval=1000,
                                     hellaswag_path=missing), launcher=TORCHRUN + TWO), timeout=120)
    assert code != 0 and not re.search(r"^step 0/", log, re.MULTILINE), log
    err = errors(log)
    assert len(err) == 1 and str(missing) in err[0], log
    assert not list(out2.glob("ckpt*.pt"))


# ----------------------------------------------------------------------------------------------------
# a stop request


def stopped_by_sigterm(data: Path, tmp_path: Path, kw: dict, line: str, step: int, stop_step: int
                       ) -> tuple[Path, Path]:
    """An uninterrupted run of kw (ref) and the same run sent SIGTERM at the start of `step`, after `line` (cut): the
    cut run exits 0, stopped and saved at `stop_step`, without that step's evaluation (due there)."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run(args(data, ref, **kw))
    p = start(args(data, cut, **kw), SLOW)
    log = signal_in_step_after(p, line, step, signal.SIGTERM)
    assert p.returncode == 0 and "Traceback" not in log, log
    assert re.search(rf"stopped at step {stop_step}\b", log) and ckpt(cut)["step"] == stop_step, log
    assert f"step {stop_step}: val loss" not in log, log
    return ref, cut


def test_stop_request_skips_pending_evaluation_and_resume_runs_it(data, tmp_path):
    """SIGTERM just after step 0's log line (at step 1's start): the run stops at the next point anything is
    due (step 5, an evaluation), saves, skips that evaluation and exits 0; init_from=resume runs it and ends
    equal to an uninterrupted run."""
    kw = {**RESUME, "max_steps": 40, "log_interval": 10, "eval_interval": 5, "ckpt_interval": 1000}
    ref, cut = stopped_by_sigterm(data, tmp_path, kw, "step 0/40", 1, stop_step=5)
    run(args(data, cut, init_from="resume", **kw))  # (without the 0.2 s steps: they only time the signal)
    assert_identical(ref, cut)


def test_stop_in_the_last_log_window_saves_the_end_and_auto_runs_the_final_evaluation(data, tmp_path):
    """SIGTERM just after step 10's log line of 14 (at step 11's start): the stop is acted on at the end (step
    14), the final checkpoint is written and the final evaluation skipped; init_from=auto then trains nothing,
    evaluates step 14 and ends equal to an uninterrupted run."""
    kw = {**RESUME, "max_steps": 14, "log_interval": 10, "eval_interval": 7}
    ref, cut = stopped_by_sigterm(data, tmp_path, kw, "step 10/14", 11, stop_step=14)
    r = run(args(data, cut, init_from="auto", **kw))
    assert step_lines(r.stdout, 14) == [] and "step 14: val loss" in r.stdout, r.stdout
    assert_identical(ref, cut)


# ----------------------------------------------------------------------------------------------------
# --overwrite=true


def test_overwrite_removes_the_old_run_before_the_new_one_can_crash(data, tmp_path):
    """--overwrite=true deletes the previous run's checkpoints and metrics at start: a crash before the new
    run's first save leaves nothing of the old run, and init_from=auto then starts the new run from scratch
    (equal to a clean run of its config) instead of continuing the old one."""
    out, clean = tmp_path / "run", tmp_path / "clean"
    run(args(data, out, max_steps=4, ckpt_interval=2))  # run A
    assert list(out.glob("ckpt*.pt"))
    new = dict(max_steps=8, lr=1e-3)
    code, log, _ = finish(start(args(data, out, overwrite=True, **new), {"crash": {"step": 1}}))  # run B
    assert code == 17, log
    assert sorted(p.name for p in out.glob("ckpt*.pt")) == [], log
    recs = records(out)
    assert all(r["step"] == 0 for r in recs), recs  # run A wrote steps 1-4; B crashed at step 1's start
    launches = [r["launch"]["config"] for r in recs if "launch" in r]
    assert all(c["max_steps"] == 8 and c["lr"] == 1e-3 for c in launches), launches
    r = run(args(data, out, init_from="auto", **new))
    assert "resumed from" not in r.stdout, r.stdout
    run(args(data, clean, **new))
    got, want = ckpt(out), ckpt(clean)
    assert got["step"] == want["step"] == 8
    for k, t in want["model"].items():
        assert torch.equal(got["model"][k], t), k


# ----------------------------------------------------------------------------------------------------
# divergence


DIVERGE = dict(max_steps=20, max_bad_steps=3, log_interval=10, ckpt_interval=4, init_from="auto")


def test_diverged_run_is_not_continued_by_auto_unless_asked(data, tmp_path):
    """NaN from step 6 with max_bad_steps=3: exit 1 naming the last good update (after step 5) and the flag that
    continues anyway (--resume_diverged_at=8); the same command again refuses at once (exit 2, no step); with the
    flag and without the fault the run resumes and finishes."""
    out = tmp_path / "nan"
    argv = args(data, out, **DIVERGE)
    code, log, _ = finish(start(argv, {"nan_from": 6}))
    assert code == 1 and "Traceback" not in log, log
    err = errors(log)
    assert len(err) == 1 and "the weights after step 5" in err[0] and "--resume_diverged_at=8" in err[0], log
    code, log, wall = finish(start(argv, {"nan_from": 6}))
    assert code == 2 and "Traceback" not in log, log
    err = errors(log)
    assert len(err) == 1 and "--resume_diverged_at=8" in err[0], log
    assert step_lines(log, 20) == [] and wall < 60, (wall, log)
    r = run(args(data, out, resume_diverged_at=8, **DIVERGE))
    assert "resumed from" in r.stdout, r.stdout
    assert ckpt(out)["step"] == 20


def test_last_good_update_is_right_after_a_resume(data, tmp_path):
    """A run crashed at step 5 (checkpoint at 4) and resumed into NaN from step 6: the error still names the
    weights after step 5 as the last good update."""
    out = tmp_path / "resumed"
    argv = args(data, out, **DIVERGE)
    code, log, _ = finish(start(argv, {"crash": {"step": 5}}))
    assert code == 17 and (out / "ckpt.pt").is_file() and ckpt(out)["step"] == 4, log
    code, log, _ = finish(start(argv, {"nan_from": 6}))
    err = errors(log)
    assert code == 1 and len(err) == 1 and "the weights after step 5" in err[0], log
    assert "--resume_diverged_at=8" in err[0], log


def test_torchrun_restart_after_divergence_refuses_instead_of_looping(data, tmp_path):
    """torchrun --max_restarts=1 with init_from=auto and NaN from step 6: the job fails, and its restart attempt
    refuses the diverged checkpoint (exit 2, naming --resume_diverged_at=8) instead of training into the NaN
    again."""
    out = tmp_path / "ddp_nan"
    p = start(args(data, out, dist_timeout_s=30, **DIVERGE), {"nan_from": 6},
              TORCHRUN + TWO + ["--max_restarts=1"])
    code, log, _ = finish(p, timeout=180)
    assert code != 0, log
    err = [ln for ln in errors(log) if "--resume_diverged_at=8" in ln]
    assert err and "the weights after step 5" in err[0], log
    first_err = log.index(err[0])
    assert step_lines(log[first_err:], 20) == [], log  # the restart trained no step
    assert re.search(r"exitcode\s*:\s*2\b", log), log  # the last attempt's workers: refused (2), not diverged (1)


# ----------------------------------------------------------------------------------------------------
# the real config, shrunk


# The shipped 124M configs, each run for 1,030 steps: (how the length is set, its warmup_steps, processes). The
# modern one runs on one process (grad_accum 4, ZeRO-1 on one rank): half the suite time of two, and the 2-rank
# path is gpt2_owt.py's here and Muon's in test_optim.py.
SHIPPED_124M = {
    "config/gpt2_owt.py": (f"--max_tokens={128 * 1030}", 700, 2),
    "config/gpt2_modern_fineweb_edu.py": ("--max_steps=1030", 0, 1),
}


def shrunk_argv(config: str, data: Path, out: Path) -> list[str]:
    """A shipped 124M config itself, only smaller: model, batch and run length; its intervals (log 10, eval 250,
    checkpoint 1000), warmup, optimizer, bf16 and ZeRO-1 stay. compile=False: torch.compile on CPU costs ~30 s per
    graph."""
    tiny = dict(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=16)
    return [config, f"--data_dir={data}", f"--out_dir={out}", "--device=cpu",
            *[f"--model_overrides.{k}={v}" for k, v in tiny.items()],
            "--micro_batch=2", "--seq_len=16", "--total_batch_tokens=128",  # grad_accum 2 on 2 ranks, 4 on 1
            SHIPPED_124M[config][0], "--eval_tokens=64", "--compile=False", "--dist_timeout_s=60",
            "--init_from=auto"]


@pytest.mark.parametrize("config", list(SHIPPED_124M))
def test_shipped_124m_config_dress_rehearsal(config, data, tmp_path):
    """A shipped 124M config under torchrun --max_restarts=1 for 1,030 steps (crossing ckpt_interval 1000 and
    eval_interval 250 four times): the last rank dies right after the step-1000 checkpoint, the workers restart,
    init_from=auto resumes at step 1000 and the job ends equal to an uninterrupted run (for the modern config:
    Muon + AdamW under ZeRO-1, with the warmdown). (Both runs: 31-33 s on a 2-core VM for gpt2_owt.py, so the
    config's intervals are kept unscaled.)"""
    from train_config import load_config

    ref, cut, marker = tmp_path / "ref", tmp_path / "cut", tmp_path / "crashed_once"
    cfg = load_config(shrunk_argv(config, data, ref))
    assert (cfg.model_overrides["pad_vocab_multiple"], cfg.model_overrides["n_embd"]) == (64, 32)  # merged
    assert (cfg.log_interval, cfg.eval_interval, cfg.ckpt_interval, cfg.warmup_steps, cfg.total_steps) == (
        10, 250, 1000, SHIPPED_124M[config][1], 1030)
    assert (cfg.dtype, cfg.zero1) == ("bf16", True)
    nproc = SHIPPED_124M[config][2]
    launcher = TORCHRUN + ["--standalone", f"--nproc_per_node={nproc}", "--max_restarts=1"]
    code, log, _ = finish(start(shrunk_argv(config, data, ref), launcher=launcher), timeout=300)
    assert code == 0, log[-5000:]
    assert f"grad_accum {4 // nproc} x world {nproc}" in log and "ZeRO-1" in log and "dtype bf16" in log, log[:2000]
    for step in (1000, 1030):
        assert load_checkpoint(ref / f"ckpt_{step:08d}.pt")["step"] == step, log[-5000:]
    assert [s for s, _ in metrics(ref)[1]] == [0, 250, 500, 750, 1000, 1030]
    faults = {"crash": {"step": 1005, "rank": nproc - 1, "once": str(marker)}}
    code, log, _ = finish(start(shrunk_argv(config, data, cut), faults, launcher), timeout=300)
    assert code == 0, log[-5000:]
    assert marker.exists() and f"injected fault: crash on rank {nproc - 1} at step 1005" in log, log[-5000:]
    assert f"resumed from {cut / 'ckpt.pt'} at step 1000" in log, log[-5000:]
    assert_identical(ref, cut)

