"""Fault injection on real train.py processes (tiny model, CPU, fp32). Every promise is checked against a run
nobody interrupted: same loss curve (metrics.jsonl, bit for bit) and same final weights/optimizer state.

Faults come from outside (SIGKILL, SIGINT, torchrun) or from tests/fault_launcher.py, which runs train.main()
with test-only patches: NaN losses, a rank that crashes or hangs at a step, a checkpoint write that stalls
half-way or fails like a full disk. README "Reliability" lists each promise with its test."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from _shards import markov_dataset
from checkpoint import load_checkpoint
from errors import UserError
from test_train import RESUME, args, assert_identical, assert_same_tree, ckpt, env, metrics, run

pytestmark = pytest.mark.e2e  # whole programs: the quick loop (-m "not e2e") leaves them out

REPO = Path(__file__).resolve().parent.parent
KW = {**RESUME, "max_steps": 12, "ckpt_interval": 2}  # dropout 0.1 inside: RNG state must survive too
DDP_KW = {**KW, "micro_batch": 2}  # 2 ranks x grad_accum 2 = one process's global batch


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return markov_dataset(tmp_path_factory.mktemp("markov") / "data")


@pytest.fixture(scope="module")
def ref(data, tmp_path_factory) -> Path:
    """The uninterrupted single-process run every single-process fault is compared with."""
    out = tmp_path_factory.mktemp("ref") / "out"
    run(args(data, out, **KW))
    return out


@pytest.fixture(scope="module")
def ref2(data, tmp_path_factory) -> Path:
    """The uninterrupted single-node 2-process run (torchrun --standalone, gloo)."""
    out = tmp_path_factory.mktemp("ref2") / "out"
    run(args(data, out, **DDP_KW), nproc=2)
    return out


def start(argv: list[str], faults: dict | None = None, launcher: list[str] | None = None) -> subprocess.Popen:
    """train.py with argv, or, given faults, tests/fault_launcher.py with them (the same train.main())."""
    script = [str(REPO / "train.py")] if faults is None else [str(REPO / "tests/fault_launcher.py"), json.dumps(faults)]
    return subprocess.Popen((launcher or [sys.executable]) + script + argv, cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_when(p: subprocess.Popen, trigger: str, sig: int, delay: float = 0.0, after: str | None = None) -> str:
    """Send `sig` once a stdout line contains `trigger` (and, if given, after a line containing `after` was
    seen); return all output. Fails if the process ended first."""
    assert p.stdout is not None
    seen, armed = [], after is None
    for line in p.stdout:
        seen.append(line)
        armed = armed or (after is not None and after in line)
        if armed and trigger in line:
            time.sleep(delay)
            p.send_signal(sig)
            break
    else:
        pytest.fail("the run ended before the fault point:\n" + "".join(seen[-30:]))
    seen.append(p.stdout.read())
    p.wait(timeout=120)
    return "".join(seen)


def finish(p: subprocess.Popen, timeout: float = 180) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"hung: no exit within {timeout} s")
    return p.returncode, out, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------
# single process


def test_random_sigkills_then_resume_equal_uninterrupted(data, ref, tmp_path):
    """Three SIGKILLs at seeded-random points (a random step, then a random 0-15 ms more, so some land inside a
    step, an evaluation or a checkpoint write), each followed by the same command with init_from=auto:
    the final run's loss curve, val losses, weights and AdamW state equal the uninterrupted run's bit for bit."""
    rng = random.Random(2024)
    out, argv = tmp_path / "cut", args(data, tmp_path / "cut", init_from="auto", **KW)
    kills, at = 0, 0
    while kills < 3:
        k = rng.randint(at, KW["max_steps"] - 4)  # a logged step index of this attempt
        log = kill_when(start(argv), f"step {k}/", signal.SIGKILL, delay=rng.uniform(0, 0.015))
        assert "Traceback" not in log, log
        kills += 1
        at = ckpt(out)["step"] if (out / "ckpt.pt").is_file() else 0
    code, log, _ = finish(start(argv))
    assert code == 0 and f"resumed from {out / 'ckpt.pt'}" in log, log
    assert_identical(ref, out)


def test_kill_during_checkpoint_write_keeps_previous(data, ref, tmp_path):
    """SIGKILL while the step-4 checkpoint is half written: ckpt.pt is still the complete step-2 checkpoint, the
    half-written temp file is never ckpt.pt, and resuming gives the uninterrupted result."""
    out = tmp_path / "cut"
    # the same command twice (the second resumes); keep_checkpoints: the resumed run's ckpt_00000004.pt stays
    argv = args(data, out, init_from="auto", keep_checkpoints=6, **KW)
    p = start(argv, {"ckpt_write": "slow:1"})
    kill_when(p, "checkpoint write in progress", signal.SIGKILL, after="saved checkpoint")
    assert p.returncode == -signal.SIGKILL
    partial = list(out.glob("ckpt.pt.*.tmp"))
    assert len(partial) == 1
    half = partial[0].read_bytes()
    # a zip's directory is at its end: torch (miniz) finds none in the half file, and load_checkpoint says so
    with pytest.raises(RuntimeError, match="failed finding central directory"):
        torch.load(partial[0], weights_only=True)
    with pytest.raises(UserError, match="is not a readable checkpoint"):
        load_checkpoint(partial[0])
    assert load_checkpoint(out / "ckpt.pt")["step"] == 2
    r = run(argv)
    assert f"resumed from {out / 'ckpt.pt'} at step 2" in r.stdout, r.stdout
    assert not list(out.glob("*.tmp"))  # the next save removed the stale temp file
    assert_identical(ref, out)
    # The temp file was the first half of the step-4 checkpoint: the resumed run wrote the same state (bit for bit)
    # to ckpt_00000004.pt. Their pickle records differ (init_from=auto resolved as "scratch" vs "resume"; a loaded
    # optimizer's param-group keys are pickled apart from train_config's), so compare the tensors: each storage
    # record of the complete file that the killed process began to write holds the same bytes in the half file,
    # up to where that file ends, and it ends before the last of them.
    with zipfile.ZipFile(out / "ckpt_00000004.pt") as z:
        storages = [(i.filename.encode(), z.read(i)) for i in z.infolist() if "/data/" in i.filename]
    begun = 0
    for name, blob in storages:
        at = half.find(name)
        while at >= 0 and struct.unpack("<H", half[at - 4: at - 2])[0] != len(name):  # archive/data/1 vs /10
            at = half.find(name, at + 1)
        if at < 0:
            break
        assert half[at - 30: at - 26] == b"PK\x03\x04", name  # a zip local file header names the record
        begin = at + len(name) + struct.unpack("<H", half[at - 2: at])[0]  # after the name and the extra field
        assert half[begin: begin + len(blob)] == blob[: max(0, len(half) - begin)], name
        begun += 1
    assert 0 < begun < len(storages), (begun, len(storages))


def test_corrupt_newest_checkpoint_resumes_from_the_previous_bit_exactly(data, ref, tmp_path):
    """The run dies after its step-8 checkpoint and that file then rots (ckpt.pt and its ckpt_00000008.pt link
    are one file): init_from=auto says so in one line, resumes from ckpt_00000006.pt and ends with the
    uninterrupted result, bit for bit."""
    out = tmp_path / "rot"
    code, log, _ = finish(start(args(data, out, **KW), {"crash": {"step": 9, "rank": 0}}))
    assert code == 17 and load_checkpoint(out / "ckpt_00000008.pt")["step"] == 8, log
    blob = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(blob[: len(blob) // 3])
    code, log, _ = finish(start(args(data, out, init_from="auto", **KW)))
    assert code == 0, log
    warn = [ln for ln in log.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "ckpt.pt is not a readable checkpoint" in warn[0], log
    assert f"resumed from {out / 'ckpt_00000006.pt'} at step 6" in log
    assert_identical(ref, out)


def test_sigint_saves_within_one_step_and_resumes(data, ref, tmp_path):
    """Ctrl-C (SIGINT) after step 5 is logged: the step in flight (at most one more) finishes, a checkpoint is
    written, exit 0; resuming gives the uninterrupted result. (SIGTERM: tests/test_train.py.)"""
    out = tmp_path / "cut"
    p = start(args(data, out, **KW))
    log = kill_when(p, "step 5/", signal.SIGINT)
    assert p.returncode == 0 and "stopped at step" in log and "Traceback" not in log, log
    # 6: the signal beat that sync's own stop check (it follows the line at once); 7: step 6 was in flight;
    # 8: the signal came after step 6's loss all-reduce
    assert ckpt(out)["step"] in (6, 7, 8)
    run(args(data, out, init_from="resume", **KW))
    assert_identical(ref, out)


def test_disk_full_is_a_clear_error_and_keeps_the_checkpoint(data, tmp_path):
    """The write of the step-6 checkpoint fails with ENOSPC half-way: one line naming the file and the fix,
    exit 2, no traceback; ckpt.pt is still the step-4 file, byte for byte, and no temp file is left."""
    out = tmp_path / "full"
    run(args(data, out, **{**KW, "max_steps": 4}))
    before = (out / "ckpt.pt").read_bytes()
    p = start(args(data, out, init_from="resume", **{**KW, "max_steps": 8}), {"ckpt_write": "enospc"})
    code, log, _ = finish(p)
    assert code == 2, log
    err = [ln for ln in log.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in log, log
    assert f"cannot write checkpoint {out / 'ckpt.pt'}: No space left on device" in err[0]
    assert "free disk space" in err[0] and "unchanged" in err[0]
    assert (out / "ckpt.pt").read_bytes() == before and not list(out.glob("*.tmp"))


def test_nan_steps_skipped_then_persistent_nan_stops_with_last_good_state(data, tmp_path):
    """Loss NaN at step 3 (skipped, logged) and from step 6 on: with max_bad_steps=3 the run stops after step 8
    with one clear error line (exit 1) and a checkpoint whose weights and AdamW state equal those of the
    same run checkpointed just before step 6 (its last good update), bit for bit. Evaluation is never made NaN:
    the step-8 val loss (of the last good weights) is finite."""
    nan_out, good_out = tmp_path / "nan", tmp_path / "good"
    faults = {"nan_steps": [3], "nan_from": 6}
    kw = {**KW, "ckpt_interval": 0, "max_bad_steps": 3}
    code, log, _ = finish(start(args(data, nan_out, **kw), faults))
    assert code == 1 and "Traceback" not in log, log
    assert "warning: step 3: non-finite loss nan" in log and "update skipped (1 in a row)" in log
    err = [ln for ln in log.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "3 consecutive steps with a non-finite loss" in err[0] and "at step 8" in err[0], log
    assert f"{nan_out / 'ckpt.pt'} holds the weights after step 5 (the last good update)" in err[0]
    assert "--resume_diverged_at=8" in err[0]
    # reference: the same faults, but a checkpoint at step 6 and a crash before step 6 runs
    faults_ref = {"nan_steps": [3], "crash": {"step": 6, "rank": 0}}
    code, log, _ = finish(start(args(data, good_out, **{**kw, "ckpt_interval": 6}), faults_ref))
    assert code == 17, log
    got, want = ckpt(nan_out), ckpt(good_out)
    assert got["step"] == 9 and want["step"] == 6
    for k, t in want["model"].items():
        assert torch.equal(got["model"][k], t), k
    assert_same_tree(want["optimizer"]["state"], got["optimizer"]["state"])
    assert [(s, repr(x)) for s, x in metrics(nan_out)[0][:6]] == [(s, repr(x)) for s, x in metrics(good_out)[0]]
    val = metrics(nan_out)[1]
    assert [s for s, _ in val] == [0, 4, 8] and val[:2] == metrics(good_out)[1] and math.isfinite(val[2][1]), val


# ----------------------------------------------------------------------------------------------------
# torchrun: crashed / hung rank, two "nodes", elastic restart

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def test_crashed_rank_fails_the_job_naming_it(data, tmp_path):
    """Rank 1 dies (exit 17) at the start of step 4's update (after both ranks ran step 4's evaluation): the job
    exits non-zero within seconds, torchrun names rank 1 as the root cause, and ckpt.pt is the intact step-4
    checkpoint."""
    out = tmp_path / "crash"
    faults = {"crash": {"step": 4, "rank": 1}}
    p = start(args(data, out, dist_timeout_s=20, **DDP_KW), faults, TORCHRUN + ["--standalone", "--nproc_per_node=2"])
    code, log, _ = finish(p, timeout=120)  # finish fails the test if the job has not exited by then
    assert code != 0, log
    assert "injected fault: crash on rank 1 at step 4" in log
    root_cause = log.split("Root Cause")[-1]  # torchrun's summary: the first rank that failed, and how
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s+exitcode\s*:\s*17", root_cause), log
    # "within seconds": rank 0 stopped on rank 1's exit (gloo's connection reset, or torchrun's SIGTERM), not by
    # waiting out its collective's dist_timeout_s=20 (that would log gloo's "Timed out waiting 20000ms")
    assert not re.search(r"timed out", log, re.IGNORECASE), log
    assert load_checkpoint(out / "ckpt.pt")["step"] == 4


def test_hung_rank_times_out_instead_of_hanging(data, tmp_path):
    """Rank 1 stops responding at the start of step 4's update (after step 4's evaluation): rank 0's next
    collective (the gradient all-reduce) fails after dist_timeout_s=5 instead of waiting forever, so the job
    exits non-zero; the step-4 checkpoint is intact."""
    out = tmp_path / "hang"
    faults = {"hang": {"step": 4, "rank": 1}}
    p = start(args(data, out, dist_timeout_s=5, **DDP_KW), faults, TORCHRUN + ["--standalone", "--nproc_per_node=2"])
    code, log, _ = finish(p, timeout=150)  # finish fails the test if the job has not exited by then
    assert code != 0 and "injected fault: hang on rank 1 at step 4" in log, log
    # rank 0's collective gave up after the configured dist_timeout_s (gloo names it in ms), which made it the
    # job's root cause (exit 1); torchrun then stopped the hung rank 1 (SIGTERM)
    assert re.search(r"\[rank0\]: \w*Error: .*Timed out waiting 5000ms", log), log
    assert re.search(r"rank\s*:\s*0 \(local_rank: 0\)\s+exitcode\s*:\s*1 ", log.split("Root Cause")[-1]), log
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s+exitcode\s*:\s*-15 .*SIGTERM", log), log
    assert load_checkpoint(out / "ckpt.pt")["step"] == 4


def test_ranks_with_different_data_stop_with_one_line(data, tmp_path):
    """Two "nodes" with separately prepared, different copies of the data: both ranks stop before training,
    with exactly one line (rank 0's) naming the mismatch; nothing is written."""
    other = markov_dataset(tmp_path / "other", train_tokens=39_000)
    out = tmp_path / "mismatch"
    faults = {"data_dir": {"rank": 1, "path": str(other)}}
    p = start(args(data, out, **DDP_KW), faults, TORCHRUN + ["--standalone", "--nproc_per_node=2"])
    code, log, _ = finish(p, timeout=120)
    assert code != 0, log
    err = [ln for ln in log.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "rank 1 reads other data than rank 0" in err[0], log
    assert not (out / "ckpt.pt").exists()


def test_ranks_with_unshared_out_dirs_stop_with_one_line(data, tmp_path):
    """init_from=auto with an out_dir that is not shared between "nodes" (rank 1 sees a checkpoint that rank 0
    does not): one line (rank 0's) naming the mismatch, before anything is loaded or written."""
    out, other = tmp_path / "shared", tmp_path / "node1"
    other.mkdir()
    (other / "ckpt.pt").write_bytes(b"not read: the ranks disagree before any checkpoint is loaded")
    faults = {"out_dir": {"rank": 1, "path": str(other)}}
    p = start(args(data, out, init_from="auto", **DDP_KW), faults, TORCHRUN + ["--standalone", "--nproc_per_node=2"])
    code, log, _ = finish(p, timeout=120)
    assert code != 0, log
    err = [ln for ln in log.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "rank 1 sees other checkpoints" in err[0] and "['ckpt.pt'] vs []" in err[0], log
    assert not (out / "ckpt.pt").exists() and sorted(p.name for p in other.iterdir()) == ["ckpt.pt"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_equal_one_node_with_two_processes(data, ref2, tmp_path):
    """Two torchrun "nodes" (--nnodes=2, one process each, c10d rendezvous on 127.0.0.1) give the single-node
    2-process run's loss curve and weights exactly."""
    out, port = tmp_path / "nodes", free_port()
    argv = args(data, out, **DDP_KW)
    nodes = [start(argv, launcher=TORCHRUN + ["--nnodes=2", "--nproc_per_node=1", f"--node_rank={i}",
                                              "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                                              "--rdzv_id=faults"]) for i in (0, 1)]
    results = [finish(p, timeout=180) for p in nodes]
    for code, log, _ in results:
        assert code == 0, log
    assert any("x world 2" in log for _, log, _ in results)
    assert_identical(ref2, out)


def test_elastic_restart_resumes_from_last_checkpoint(data, ref2, tmp_path):
    """torchrun --max_restarts=1, rank 1 crashes once at step 6: torchrun restarts both workers, init_from=auto
    resumes from the step-6 checkpoint, and the job ends (exit 0) with the uninterrupted 2-process result."""
    out, marker = tmp_path / "elastic", tmp_path / "crashed_once"
    faults = {"crash": {"step": 6, "rank": 1, "once": str(marker)}}
    p = start(args(data, out, init_from="auto", dist_timeout_s=30, **DDP_KW), faults,
              TORCHRUN + ["--standalone", "--nproc_per_node=2", "--max_restarts=1"])
    code, log, _ = finish(p, timeout=240)
    assert code == 0, log
    assert marker.exists() and "injected fault: crash on rank 1 at step 6" in log
    assert f"resumed from {out / 'ckpt.pt'} at step 6" in log
    assert_identical(ref2, out)
