"""bench.py on CPU with tiny settings: the JSON it writes, the FLOPs it counts, real-loader mode, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bench
from conftest import hide_gpu

REPO = Path(__file__).resolve().parent.parent
TINY = ["--set", "vocab_size=500", "--set", "n_layer=2", "--set", "n_head=2", "--set", "n_embd=32",
        "--batch-size", "2", "--seq-len", "16", "--steps", "3", "--warmup", "1", "--device", "cpu"]


def run_bench(*extra: str) -> dict:
    return bench.run(bench.parse_args([*TINY, *extra]))


@pytest.mark.e2e
def test_cli_writes_json_with_every_field(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "bench.py", *TINY, "--measure-ceiling", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert set(bench.JSON_FIELDS) <= set(res)
    assert "tokens/s" in proc.stdout and "GFLOP/s" in proc.stdout and "peak memory" in proc.stdout
    assert res["device"] == "cpu" and res["steps"] == 3 and len(res["step_ms"]) == 3
    assert res["step_ms_min"] <= res["step_ms_median"] <= res["step_ms_max"]
    assert res["mfu"] is None and res["peak_tflops"] is None  # no peak FLOP/s for a CPU
    assert res["ceiling_tflops"] > 0 and 0 < res["mfu_vs_ceiling"]
    assert res["memory_kind"] == "process_peak_rss" and res["peak_memory_bytes"] > 50 * 2**20
    assert res["compile"] is False and res["compile_s"] is None
    # tokens/s is B*T over the step time (the loop has nothing else in it), achieved = FLOPs/token x tokens/s
    mean_ms = sum(res["step_ms"]) / 3
    assert res["tokens_per_s"] == pytest.approx(2 * 16 / (mean_ms / 1e3), rel=0.1)
    assert res["achieved_tflops"] == pytest.approx(res["flops_per_token"] * res["tokens_per_s"] / 1e12, rel=1e-9)
    # an untrained model on uniform random tokens predicts ~uniformly: loss ~ ln(vocab)
    assert res["loss_first"] == pytest.approx(math.log(500), abs=0.3)


def test_flops_per_token_formula() -> None:
    """Counted by hand, independently of model.py: 6 x (weights each token multiplies: 12 d^2 + 13 d per layer,
    the final norm, the unpadded output head) + 12 L T d for attention."""
    res = run_bench("--set", "vocab_size=1000")
    L, d, T, V = 2, 32, 16, 1000
    n = L * (12 * d * d + 13 * d) + 2 * d + V * d
    assert res["pad_vocab"] == 64 and res["model"]["vocab_size"] == V
    assert res["flops_per_token"] == 6 * n + 12 * L * T * d
    assert res["params"] == n + 1024 * d + (1024 - V) * d  # + position table + the 24 padding rows


def test_plain_loop_and_switches() -> None:
    res = run_bench("--plain")
    assert res["plain"] and res["pad_vocab"] == 1 and not res["fused_adamw"] and not res["tf32"]
    assert math.isfinite(res["loss_last"])
    res = run_bench("--fused-adamw", "on", "--pad-vocab", "off", "--attention", "manual", "--dtype", "bf16")
    assert res["fused_adamw"] and res["pad_vocab"] == 1 and res["attention"] == "manual" and res["dtype"] == "bf16"
    assert res["loss_first"] == pytest.approx(math.log(500), abs=0.3)


def test_vs_plain_alternates_fast_and_plain_steps() -> None:
    res = run_bench("--vs-plain", "--steps", "4")
    v = res["vs_plain"]
    assert v["pairs"] == 4 and v["fast_ms_median"] > 0 and v["plain_ms_median"] > 0
    assert 0 < v["ratio_min"] <= v["ratio_q1"] <= v["ratio_median"] <= v["ratio_q3"] <= v["ratio_max"]
    assert run_bench()["vs_plain"] is None


def test_ceiling_tflops_is_taken_not_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """--ceiling-tflops X: MFU against X, and no matmul is timed (even with --measure-ceiling)."""
    monkeypatch.setattr(bench.common, "measure_matmul_tflops", lambda *a, **k: pytest.fail("ceiling was measured"))
    res = run_bench("--ceiling-tflops", "2.5", "--measure-ceiling")
    assert res["ceiling_tflops"] == 2.5
    assert res["mfu_vs_ceiling"] == pytest.approx(res["achieved_tflops"] / 2.5, rel=1e-9)


def test_config_file_sets_model_and_batch(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.py"
    cfg.write_text("model = 'gpt2'\nmodel_overrides = {'n_layer': 1, 'n_head': 2, 'n_embd': 32}\n"
                   "micro_batch = 3\nseq_len = 8\ndtype = 'fp32'\nmax_tokens = 1000\nlr = 1e-3\n")
    res = bench.run(bench.parse_args([str(cfg), "--steps", "2", "--warmup", "0", "--device", "cpu"]))
    assert (res["batch_size"], res["seq_len"], res["model"]["n_layer"], res["dtype"]) == (3, 8, 1, "fp32")
    assert res["first_step_s"] is None  # no warm-up step


def test_real_loader_mode(tmp_path: Path) -> None:
    """--data reads batches through data.TokenLoader: a dataset of one repeated 17-token pattern is learnable,
    so the loss falls far below ln(vocab) within a few steps, which random tokens cannot do."""
    d = tmp_path / "ds"
    d.mkdir()
    tokens = np.tile(np.arange(17, dtype=np.uint16), 400)
    tokens.tofile(d / "train_000000.bin")
    tokens[:200].tofile(d / "val_000000.bin")
    (d / "meta.json").write_text(json.dumps({
        "format": 1, "tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256, "dtype": "uint16", "source": "test",
        "splits": {"train": [{"file": "train_000000.bin", "tokens": len(tokens), "docs": 1}],
                   "val": [{"file": "val_000000.bin", "tokens": 200, "docs": 1}]}}))
    cfg = tmp_path / "cfg.py"
    cfg.write_text("lr = 1e-2\nmax_steps = 1\n")
    res = bench.run(bench.parse_args([str(cfg), *TINY, "--data", str(d), "--steps", "15"]))  # last --steps wins
    assert res["data"] == str(d)
    assert res["loss_first"] == pytest.approx(math.log(500), abs=0.3)
    assert res["loss_last"] < 3.0  # random tokens stay at ~6.2


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "0"], "--steps"),
    (["--ceiling-tflops", "0"], "--ceiling-tflops"),
    (["--set", "n_layer"], "KEY=VALUE"),
    (["--device", "cuda:0"], "CUDA"),
    (["--data", "/nonexistent/ds"], "/nonexistent/ds"),
    (["--attention", "nope"], "attention"),
])
@pytest.mark.e2e
def test_bad_input_is_one_line_exit_2(argv: list[str], needle: str) -> None:
    proc = subprocess.run([sys.executable, "bench.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=hide_gpu())  # so --device cuda:0 meets no CUDA on a GPU machine too
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
