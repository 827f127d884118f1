"""train.py end to end on CPU: DDP + ZeRO-1 equals one process, exact resume after SIGTERM and after a hard
kill, non-finite steps, the HellaSwag hook, the Shakespeare quickstart learning, sample.py and plot.py.
References are runs nobody edited: an uninterrupted run, a single-process run, the initial weights."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from _shards import markov_dataset, write_dataset
from model import GPT, GPTConfig

pytestmark = pytest.mark.e2e  # whole programs: the quick loop (-m "not e2e") leaves them out

REPO = Path(__file__).resolve().parent.parent
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 64, "block_size": 32}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return markov_dataset(tmp_path_factory.mktemp("markov") / "data")


def args(data: Path, out: Path, **kw: object) -> list[str]:
    base = dict(data_dir=data, out_dir=out, model_overrides=TINY, micro_batch=2, seq_len=16, total_batch_tokens=128,
                max_steps=6, warmup_steps=2, lr=3e-3, eval_interval=3, eval_tokens=64, log_interval=1, ckpt_interval=0,
                dtype="fp32", seed=7, device="cpu")  # CPU tests pin the CPU, also on a GPU machine
    base.update(kw)
    return [f"--{k}={v}" for k, v in base.items()]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}


def run(argv: list[str], nproc: int = 1, timeout: int = 180) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + [str(REPO / "train.py"), *argv]
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def metrics(out: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_ = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    return train_, val


def ckpt(out: Path) -> dict:
    return torch.load(out / "ckpt.pt", weights_only=True)


def test_ddp_zero1_equals_single_process(data, tmp_path):
    """One process with grad_accum=4 vs torchrun 2 x gloo with grad_accum=2 and ZeRO-1: same data per step,
    so the same loss curve, val losses, final weights and (consolidated) AdamW state."""
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run(args(data, one))
    r2 = run(args(data, two, zero1=True), nproc=2)
    assert "grad_accum 4 x world 1" in r1.stdout and "grad_accum 2 x world 2" in r2.stdout and "ZeRO-1" in r2.stdout
    (t1, v1), (t2, v2) = metrics(one), metrics(two)
    assert [s for s, _ in t1] == list(range(6)) and [s for s, _ in t2] == list(range(6))
    np.testing.assert_allclose([x for _, x in t2], [x for _, x in t1], rtol=0, atol=1e-5)
    np.testing.assert_allclose([x for _, x in v2], [x for _, x in v1], rtol=0, atol=1e-5)
    assert t1[-1][1] < t1[0][1] - 0.05  # it trained
    c1, c2 = ckpt(one), ckpt(two)
    for k, w in c1["model"].items():
        torch.testing.assert_close(c2["model"][k], w, rtol=0, atol=1e-5)
    s1, s2 = c1["optimizer"]["state"], c2["optimizer"]["state"]
    assert sorted(s1) == sorted(s2) and len(s1) == len(list(GPT(GPTConfig(**TINY)).parameters()))
    for i in s1:
        torch.testing.assert_close(s2[i]["exp_avg"], s1[i]["exp_avg"], rtol=0, atol=1e-5)
        torch.testing.assert_close(s2[i]["exp_avg_sq"], s1[i]["exp_avg_sq"], rtol=1e-4, atol=1e-9)
    assert len(c2["rng"]) == 2 and c1["step"] == c2["step"] == 6 and c1["loader"] == c2["loader"]


def interrupted_run(argv: list[str], trigger: str, sig: int) -> subprocess.Popen:
    """Start train.py, send `sig` when a stdout line contains `trigger`; return the finished process."""
    p = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    for line in p.stdout:
        if trigger in line:
            p.send_signal(sig)
            break
    p.stdout.read()
    p.wait(timeout=120)
    return p


def assert_identical(ref: Path, resumed: Path) -> None:
    (tr, vr), (tx, vx) = metrics(ref), metrics(resumed)
    assert tx == tr and vx == vr  # every logged loss, bit for bit (JSON keeps a float's exact repr)
    cr, cx = ckpt(ref), ckpt(resumed)
    assert cr["step"] == cx["step"] and cr["loader"] == cx["loader"] and cr["tokens_seen"] == cx["tokens_seen"]
    for k in cr["model"]:
        assert torch.equal(cr["model"][k], cx["model"][k]), k
    assert_same_tree(cr["optimizer"], cx["optimizer"])  # AdamW's state, or Muon's and AdamW's side by side


def assert_same_tree(a: object, b: object, where: str = "optimizer") -> None:
    """Equal nested dicts/lists of tensors and plain values, every tensor bit for bit."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    else:
        assert a == b, where


# Heavier steps than the other tests (512 tokens, grad_accum 4) leave room between the signal and the end.
RESUME = dict(micro_batch=4, seq_len=32, total_batch_tokens=512, max_steps=10, eval_interval=4,
              model_overrides={**TINY, "n_embd": 64, "dropout": 0.1})  # dropout: the RNG must resume too


def test_resume_after_sigterm_is_bit_identical(data, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run(args(data, ref, **RESUME))
    p = interrupted_run(args(data, cut, **RESUME), "step 1/10", signal.SIGTERM)
    out = p.stderr.read() if p.stderr else ""
    assert p.returncode == 0, out  # finished the step, saved, exited cleanly
    stopped_at = ckpt(cut)["step"]
    assert 2 <= stopped_at < 10
    assert [s for s, _ in metrics(cut)[0]] == list(range(stopped_at))
    r = run(args(data, cut, init_from="resume", **RESUME))
    assert f"resumed from {cut / 'ckpt.pt'} at step {stopped_at}" in r.stdout
    assert_identical(ref, cut)


def test_resume_after_hard_kill_is_bit_identical(data, tmp_path):
    """SIGKILL (no handler runs) after the step-3 checkpoint, bf16 autocast: metrics.jsonl may hold steps past the
    checkpoint; the resumed run drops them and repeats those steps exactly. (fp32: the same run in
    test_autobatch.py::test_train_auto_on_cpu_and_resume_keeps_the_checkpoints_micro_batch.)"""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    kw = {**RESUME, "ckpt_interval": 3, "dtype": "bf16"}
    run(args(data, ref, **kw))
    p = interrupted_run(args(data, cut, **kw), "at step 3", signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    assert ckpt(cut)["step"] in (3, 6, 9)
    run(args(data, cut, init_from="resume", **kw))
    assert_identical(ref, cut)


@pytest.mark.slow
def test_ddp_resume_with_zero1_checkpoint(data, tmp_path):
    """torchrun 2 x ZeRO-1: stop by SIGTERM (torchrun forwards it), resume from the consolidated optimizer
    state; the result equals an uninterrupted 2-process run to float precision."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    kw = {**RESUME, "micro_batch": 2}
    run(args(data, ref, **kw), nproc=2)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    p = subprocess.Popen(launcher + [str(REPO / "train.py"), *args(data, cut, **kw)], cwd=REPO, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None
    for line in p.stdout:
        if "step 1/10" in line:
            p.send_signal(signal.SIGTERM)
            break
    rest = p.stdout.read()
    p.wait(timeout=120)
    assert (cut / "ckpt.pt").is_file() and 1 <= ckpt(cut)["step"] < 10, rest
    run(args(data, cut, init_from="resume", **kw), nproc=2)
    (tr, vr), (tx, vx) = metrics(ref), metrics(cut)
    assert [s for s, _ in tx] == list(range(10)) and [s for s, _ in vx] == [s for s, _ in vr]
    np.testing.assert_allclose([x for _, x in tx + vx], [x for _, x in tr + vr], rtol=0, atol=1e-6)
    cr, cx = ckpt(ref), ckpt(cut)
    for k in cr["model"]:
        torch.testing.assert_close(cx["model"][k], cr["model"][k], rtol=0, atol=1e-6)


def in_process_cfg(data: Path, out: Path, **kw: object) -> train.TrainConfig:
    return train.load_config(args(data, out, **kw))


def test_non_finite_step_is_skipped_then_stops(data, tmp_path, monkeypatch, capsys):
    forward = GPT.forward

    def nan_forward(self, idx, targets=None, **kw):
        logits, loss, *aux = forward(self, idx, targets, **kw)
        return logits, (loss * float("nan") if loss is not None and self.training else loss), *aux

    monkeypatch.setattr(GPT, "forward", nan_forward)
    # one step, all NaN: the update is skipped, so the saved weights are the initial ones
    cfg = in_process_cfg(data, tmp_path / "a", max_steps=1, eval_interval=0)
    train.train(cfg)
    torch.manual_seed(cfg.seed)
    init = GPT(GPTConfig(**TINY)).state_dict()
    saved = ckpt(tmp_path / "a")["model"]
    assert all(torch.equal(saved[k], v) for k, v in init.items())
    assert "non-finite loss nan" in capsys.readouterr().out
    # every step NaN: stop after max_bad_steps in a row with a clear message
    with pytest.raises(train.TrainingDiverged, match="3 consecutive steps with a non-finite loss"):
        train.train(in_process_cfg(data, tmp_path / "b", max_steps=20, max_bad_steps=3, eval_interval=0))
    assert len(metrics(tmp_path / "b")[0]) == 3


def test_hellaswag_hook(data, tmp_path, monkeypatch):
    """HellaSwag has its own interval (not tied to eval_interval), always scores the final model, and runs
    under the run's autocast at a max_length the model can take."""
    calls = []

    def fake_eval(model, data_path=None, limit=None, device=None, rank=0, world_size=1, max_length=512, **kw):
        calls.append(dict(model=model, limit=limit, data_path=data_path, max_length=max_length,
                          autocast=torch.is_autocast_enabled("cpu"), dtype=torch.get_autocast_dtype("cpu")))
        return {"acc": 0.25, "acc_norm": 0.3 + 0.01 * len(calls)}

    monkeypatch.setitem(sys.modules, "eval_hellaswag", types.SimpleNamespace(evaluate_hellaswag=fake_eval,
                                                                          load_hellaswag=lambda *a: ()))
    out = tmp_path / "hs"
    train.train(in_process_cfg(data, out, max_steps=5, eval_interval=2, hellaswag_interval=3, hellaswag_limit=5,
                               hellaswag_path="/x.jsonl", dtype="bf16"))
    assert len(calls) == 2  # step 3 and the final step 5; never at step 0 (an untrained model)
    assert all(isinstance(c["model"], GPT) and c["limit"] == 5 and c["data_path"] == "/x.jsonl" for c in calls)
    assert all(c["autocast"] and c["dtype"] == torch.bfloat16 and c["max_length"] == TINY["block_size"]
               for c in calls)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["hellaswag_acc_norm"]) for r in recs if "hellaswag_acc_norm" in r] == [
        (3, pytest.approx(0.31)), (5, pytest.approx(0.32))]


def test_wandb_offline_resumes_same_run(data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "wb"
    run(args(data, out, max_steps=2, wandb_log=True))
    run_id = ckpt(out)["wandb_run_id"]
    assert run_id and any(p.name.endswith(run_id) for p in (out / "wandb").iterdir())
    run(args(data, out, max_steps=3, wandb_log=True, init_from="resume"))
    assert ckpt(out)["wandb_run_id"] == run_id


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory) -> Path:
    """Tiny Shakespeare as GPT-2 tokens, 90/10 split, written by the test itself (not prepare_data.py)."""
    from conftest import shared_file
    from tokenizer import EOT, get_tokenizer

    text = shared_file("tinyshakespeare.txt").read_text()
    toks = np.array(get_tokenizer().encode_ordinary(text), dtype=np.int64)
    n = int(len(toks) * 0.9)
    return write_dataset(tmp_path_factory.mktemp("shk") / "data",
                         {"train": [np.concatenate([[EOT], toks[:n]])], "val": [np.concatenate([[EOT], toks[n:]])]})


def test_unigram_level_claim(shakespeare):
    """The ~6.5-nat unigram level quoted in config/shakespeare_cpu.py, recomputed."""
    from data import open_split

    tr, va = open_split(shakespeare, "train")[0], open_split(shakespeare, "val")[0]
    counts = np.bincount(tr, minlength=50257) + 1e-3
    xent = float(-np.log(counts[va] / counts.sum()).mean())
    assert 6.3 < xent < 6.8


def test_init_from_hf_folder(data, tmp_path):
    """init_from=<HF folder>: the step-0 val loss equals transformers' GPT2LMHeadModel on the same rows."""
    transformers = pytest.importorskip("transformers")
    from data import TokenLoader
    from hf import export_hf_gpt2

    torch.manual_seed(0)
    hf_dir = export_hf_gpt2(GPT(GPTConfig(**TINY)), tmp_path / "hf")
    out = tmp_path / "ft"
    train.train(in_process_cfg(data, out, init_from=str(hf_dir), model_overrides={}, max_steps=1, eval_tokens=96))
    ours = metrics(out)[1][0]
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    loader = TokenLoader(data, "val", 2, 16, shuffle=False)
    with torch.no_grad():
        ref = np.mean([torch.nn.functional.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
                       for x, y in (loader.next_batch() for _ in range(3))])
    assert ours[0] == 0 and ours[1] == pytest.approx(float(ref), abs=1e-5)


def test_moe_aux_loss_is_logged(data, tmp_path):
    moe = {**TINY, "mlp": "moe", "n_experts": 4, "moe_top_k": 2}
    train.train(in_process_cfg(data, tmp_path, model_overrides=moe, max_steps=2, eval_interval=0))
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    aux = [r["moe_aux_loss"] for r in recs if "loss" in r]
    assert len(aux) == 2 and all(math.isfinite(a) and a > 0 for a in aux)
    dense_out = tmp_path / "dense"
    train.train(in_process_cfg(data, dense_out, max_steps=1, eval_interval=0))
    assert not any("moe_aux_loss" in json.loads(x) for x in (dense_out / "metrics.jsonl").read_text().splitlines())


def test_scratch_run_refuses_to_replace_an_existing_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    run(args(data, out, max_steps=2, eval_interval=0))
    before = (out / "ckpt.pt").read_bytes()
    cmd = [sys.executable, str(REPO / "train.py"), *args(data, out, max_steps=2, eval_interval=0)]
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "already exists" in r.stderr and "--overwrite=true" in r.stderr
    assert (out / "ckpt.pt").read_bytes() == before
    run(args(data, out, max_steps=3, eval_interval=0, overwrite=True))  # asked for: starts over
    assert ckpt(out)["step"] == 3


def test_val_bits_per_byte_is_loss_times_tokens_over_bytes(tmp_path):
    """val_bpb = val_loss * tokens / (bytes * ln 2) over the val split, its bytes counted here from the text
    (the first 3 documents, non-ASCII included) and its tokens by tiktoken's GPT-2 BPE, independently of
    prepare_data's counting."""
    from tokenizer import get_tokenizer

    docs = [f"Ünïcödé line {i}: " + "the quick brown fox jumps over the lazy dog. " * (30 + i) for i in range(12)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(docs), encoding="utf-8")
    r = subprocess.run([sys.executable, str(REPO / "prepare_data.py"), "--files", corpus, "--doc-sep", "\n\n",
                        "--val-docs", "3", "--name", "bpb", "--out-dir", tmp_path / "data", "--no-progress"],
                       cwd=REPO, capture_output=True, text=True, env=env())
    assert r.returncode == 0, r.stderr
    val_bytes = sum(len(d.encode("utf-8")) for d in docs[:3])
    enc = get_tokenizer()
    val_tokens = sum(1 + len(enc.encode_ordinary(d)) for d in docs[:3])  # each document preceded by EOT
    out = tmp_path / "out"
    run(args(tmp_path / "data", out, model_overrides={**TINY, "vocab_size": 50304, "block_size": 64}, seq_len=32,
             micro_batch=2, total_batch_tokens=64, max_steps=1, eval_interval=1, eval_tokens=128))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in recs if "val_loss" in r]
    assert vals and all(r["val_bpb"] == pytest.approx(r["val_loss"] * val_tokens / (val_bytes * math.log(2)),
                                                       rel=1e-12) for r in vals)
