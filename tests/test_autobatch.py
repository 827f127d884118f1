"""micro_batch="auto" (autobatch.py): the config value, the candidates, the search against a brute-force answer,
real training-step probes on CPU with a simulated out-of-memory threshold (GPT.forward raises torch's
OutOfMemoryError above K rows), the smallest answer over two real gloo ranks, and train.py end to end on CPU
(where auto takes the default, or the checkpoint's micro_batch when resuming, which then equals a run that
was never interrupted)."""

from __future__ import annotations

import datetime
import gc
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import autobatch
import train
from _shards import markov_dataset
from common import Dist
from errors import UserError
from model import GPT
from test_train import RESUME, TINY, args, assert_identical, ckpt, env, interrupted_run, run
from train_config import TrainConfig, load_config

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return markov_dataset(tmp_path_factory.mktemp("markov") / "data")


def tiny_cfg(total_rows: int, **kw: object) -> TrainConfig:
    base = dict(model_overrides=TINY, seq_len=16, total_batch_tokens=16 * total_rows, micro_batch="auto", max_steps=1,
                dtype="fp32", device="cpu", zero1=False)
    return TrainConfig(**{**base, **kw})


def simulate_oom_above(k: int, seen: list | None = None):
    """GPT.forward that runs, then raises torch's OutOfMemoryError for a batch of more than k rows (so the
    failing step leaves a live autograd graph behind, as a real one does)."""
    forward = GPT.forward

    def patched(self, idx, *a, **kw):
        out = forward(self, idx, *a, **kw)
        if seen is not None:
            seen.append(("forward", idx.shape[0]))
        if idx.shape[0] > k:
            raise autobatch.OutOfMemory(f"CUDA out of memory (simulated: {idx.shape[0]} rows > {k})")
        return out

    return patched


# ----------------------------------------------------------------------------------------------------
# config


def test_config_takes_auto_or_a_positive_int(tmp_path):
    assert load_config(["--micro_batch=auto", "--max_steps=1"]).micro_batch == "auto"
    assert load_config(["--micro_batch=32", "--max_steps=1"]).micro_batch == 32  # an int, not the string "32"
    f = tmp_path / "c.py"
    f.write_text("micro_batch = 'auto'\nmax_steps = 1\n")
    assert load_config([str(f)]).micro_batch == "auto"
    for argv, match in ((["--micro_batch=three"], "not a valid int | 'auto'"),
                        (["--micro_batch=Auto"], "not a valid int | 'auto'"),
                        (["--micro_batch=0"], "micro_batch=0 must be positive"),
                        (["--micro_batch=2.5"], "micro_batch must be int | 'auto', got float")):
        with pytest.raises(UserError, match=match.replace("|", r"\|")):
            load_config([*argv, "--max_steps=1"])
    with pytest.raises(UserError, match="micro_batch must be int | 'auto', got bool".replace("|", r"\|")):
        TrainConfig(micro_batch=True, max_steps=1)


# ----------------------------------------------------------------------------------------------------
# candidates and the search


def test_candidates_are_the_divisors_of_the_rows_per_rank():
    assert autobatch.micro_batch_candidates(524_288, 1024, 8) == [1, 2, 4, 8, 16, 32, 64]
    for rows in (1, 7, 48, 97, 360, 1024):
        got = autobatch.micro_batch_candidates(rows * 16 * 3, 16, 3)
        assert got == [b for b in range(1, rows + 1) if rows % b == 0]
    for total, seq, world in ((100, 16, 1), (8, 16, 1), (1024 * 12, 1024, 8)):
        with pytest.raises(UserError, match=f"total_batch_tokens={total} is not a multiple of seq_len"):
            autobatch.micro_batch_candidates(total, seq, world)


@pytest.mark.parametrize("rows", [1, 2, 64, 97, 360, 512])
def test_search_finds_the_largest_fitting_divisor_in_logarithmic_probes(rows):
    cands = autobatch.micro_batch_candidates(rows, 1, 1)
    bound = 1 + math.ceil(math.log2(len(cands)))
    for k in range(0, rows + 2):
        fitting = [b for b in cands if b <= k]
        for prefer in (None, *cands):
            if not fitting:
                with pytest.raises(UserError, match="not even micro_batch=1 fits"):
                    autobatch.search(lambda b, k=k: b <= k, cands, prefer)
                continue
            s = autobatch.search(lambda b, k=k: b <= k, cands, prefer)
            tried = [b for b, _ in s.tried]
            assert all(ok == (b <= k) for b, ok in s.tried) and len(set(tried)) == len(tried)
            if prefer is not None and prefer <= k:  # a resumed run keeps its micro_batch if it still fits
                assert s.micro_batch == prefer and tried == [prefer]
                continue
            assert s.micro_batch == max(fitting)
            assert len(tried) <= bound + (prefer is not None), (k, prefer, tried)
            if prefer is None:
                assert tried[0] == cands[-1]  # from the largest


@pytest.mark.e2e
def test_probes_run_real_steps_and_free_everything(monkeypatch):
    """train.train_step + train.build_optimizer on copies of a tiny GPT, OOM above 10 rows: 8 of the divisors
    of 48 is found; every probe is followed by torch.cuda.empty_cache; the model, its gradients and the RNG
    are as before, and no probe model outlives the search."""
    events: list = []
    monkeypatch.setattr(GPT, "forward", simulate_oom_above(10, events))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append(("empty_cache",)))
    cfg = tiny_cfg(48)
    torch.manual_seed(0)
    model = GPT(cfg.model_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gc.collect()  # GPTs an earlier test in this worker left as garbage must not count as this one's
    n_models = sum(type(o) is GPT for o in gc.get_objects())
    rng = torch.get_rng_state()

    s = autobatch.search_micro_batch(model, cfg, Dist(), train.train_step, train.build_optimizer)

    assert s.micro_batch == 8 and s.tried == [(48, False), (6, True), (12, False), (8, True)]
    probes, current = [], None  # forward batch sizes between two empty_cache calls
    for e in events:
        if e[0] == "empty_cache":
            probes.append(current)
            current = None
        else:
            current = (current or []) + [e[1]]
    assert events[-1] == ("empty_cache",) and len(probes) == len(s.tried)
    grad_accum = {b: min(2, 48 // b) for b, _ in s.tried}
    for (b, ok), fwd in zip(s.tried, probes):  # a fitting probe ran its 2 full steps; a failing one stopped
        assert fwd == ([b] * 2 * grad_accum[b] if ok else [b]), (b, fwd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters()) and next(model.parameters()).device.type == "cpu"
    assert torch.equal(torch.get_rng_state(), rng)
    gc.collect()
    assert sum(type(o) is GPT for o in gc.get_objects()) == n_models


def test_a_real_error_in_a_probe_is_not_taken_for_out_of_memory(monkeypatch):
    def broken(self, *a, **kw):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(GPT, "forward", broken)
    cfg = tiny_cfg(8)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        autobatch.search_micro_batch(GPT(cfg.model_config()), cfg, Dist(), train.train_step, train.build_optimizer)


def _rank(rank: int, init_file: str, limits: tuple[int, int], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    torch.set_num_threads(1)
    GPT.forward = simulate_oom_above(limits[rank])
    cfg = tiny_cfg(96)  # 48 rows per rank
    d = Dist(rank, rank, 2, torch.device("cpu"))
    s = autobatch.search_micro_batch(GPT(cfg.model_config()), cfg, d, train.train_step, train.build_optimizer)
    Path(out, str(rank)).write_text(f"{s.micro_batch} {autobatch.min_over_ranks(s.micro_batch, d)}")
    dist.destroy_process_group()


@pytest.mark.e2e
def test_ranks_probe_independently_then_take_the_smallest(tmp_path):
    """Two gloo ranks with different memory (OOM above 10 / 5 rows) probe different sizes a different number of
    times (so a collective inside a probe would leave one rank waiting); both end with min(8, 4) = 4."""
    mp.spawn(_rank, args=(str(tmp_path / "init"), (10, 5), str(tmp_path)), nprocs=2)
    assert (tmp_path / "0").read_text() == "8 4" and (tmp_path / "1").read_text() == "4 4"


# ----------------------------------------------------------------------------------------------------
# train.py end to end (CPU)


@pytest.mark.e2e
def test_train_auto_on_cpu_and_resume_keeps_the_checkpoints_micro_batch(data, tmp_path):
    """Scratch: 8 rows per step -> micro_batch 8 (<= the default 16), said in one line. A run at micro_batch 4
    (16 rows per step) killed after its step-3 checkpoint and resumed with auto keeps 4 (the default rule would
    give 16) and ends equal to the run nobody interrupted."""
    r = run(args(data, tmp_path / "auto", micro_batch="auto", max_steps=1, eval_interval=0))
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("micro_batch auto")]
    assert line == ["micro_batch auto: 8 x grad_accum 1 (on cpu there is no device memory to probe: the largest "
                    "divisor of the 8 rows per rank and step that is <= the default 16)"], r.stdout
    assert "micro_batch 8 x seq 16 x grad_accum 1" in r.stdout
    assert ckpt(tmp_path / "auto")["train_config"]["micro_batch"] == 8

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    kw = {**RESUME, "ckpt_interval": 3}
    run(args(data, ref, **kw))
    p = interrupted_run(args(data, cut, **kw), "at step 3", signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL and ckpt(cut)["step"] == 3
    r = run(args(data, cut, **{**kw, "init_from": "resume", "micro_batch": "auto"}))
    assert "micro_batch auto: 4 x grad_accum 4 (on cpu there is no device memory to probe: the checkpoint's)" \
        in r.stdout, r.stdout
    assert_identical(ref, cut)


@pytest.mark.e2e
def test_train_auto_with_no_dividing_micro_batch_is_one_line(data, tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "train.py"),
                        *args(data, tmp_path / "out", micro_batch="auto", total_batch_tokens=100)],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0] == ("error: micro_batch=auto: total_batch_tokens=100 is not a multiple of seq_len * world_size "
                        "= 16*1 = 16, so no micro_batch divides it; set total_batch_tokens to a multiple of 16")


# ----------------------------------------------------------------------------------------------------
# CUDA: a real memory limit instead of a simulated one


@pytest.mark.cuda
def test_cuda_search_under_a_real_memory_cap():
    """With the process capped to a slice of the GPU, the chosen micro_batch runs a training step, the next
    candidate runs out of memory for real, and the search leaves no memory allocated or cached behind."""
    dev = torch.device("cuda")
    cfg = TrainConfig(model_overrides={"n_layer": 4, "n_head": 4, "n_embd": 256, "vocab_size": 50304},
                      seq_len=1024, total_batch_tokens=1024 * 256, micro_batch="auto", max_steps=1, dtype="bf16")
    model = GPT(cfg.model_config())
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(4 * 2**30 / total, dev)  # 4 GiB
    try:
        allocated, reserved = torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev)
        d = Dist(device=dev)
        s = autobatch.search_micro_batch(model, cfg, d, train.train_step, train.build_optimizer)
        assert 1 <= s.micro_batch < 256 and any(not ok for _, ok in s.tried), s.tried
        assert torch.cuda.memory_allocated(dev) == allocated and torch.cuda.memory_reserved(dev) == reserved
        cands = autobatch.micro_batch_candidates(cfg.total_batch_tokens, cfg.seq_len, 1)
        nxt = cands[cands.index(s.micro_batch) + 1]
        fits = autobatch.step_fits(model, cfg, d, s.micro_batch, 256 // s.micro_batch, train.train_step,
                                   train.build_optimizer)
        autobatch._free(False)
        too_big = autobatch.step_fits(model, cfg, d, nxt, 256 // nxt, train.train_step, train.build_optimizer)
        autobatch._free(False)
        assert fits and not too_big
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)

