"""bench.py on CPU with tiny settings: the JSON it writes, the FLOPs it counts, real-loader mode, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
from conftest import hide_gpu
from model import GPT

REPO = Path(__file__).resolve().parent.parent
TINY = ["--set", "vocab_size=500", "--set", "n_layer=2", "--set", "n_head=2", "--set", "n_embd=32",
        "--batch-size", "2", "--seq-len", "16", "--steps", "3", "--warmup", "1", "--device", "cpu"]
L, D, B, T, V = 2, 32, 2, 16, 500  # TINY's model and batch
BLOCK = 1024  # GPTConfig's default block_size: the rows of the position table


def run_bench(*extra: str) -> dict:
    return bench.run(bench.parse_args([*TINY, *extra]))


def matmul_weights(L: int, d: int, V: int) -> int:
    """Counted by hand, independently of model.py: the weights each token is multiplied by. Per layer
    12 d^2 + 13 d (qkv 3d^2 + 3d, attention projection d^2 + d, MLP 8d^2 + 5d, two LayerNorms 4d), the final
    LayerNorm 2d, the unpadded output head V d (tied to the token table, which is a lookup, not a matmul)."""
    return L * (12 * d * d + 13 * d) + 2 * d + V * d


def hand_flops_per_token(L: int, d: int, T: int, V: int) -> int:
    """6 FLOPs per weight and token (forward + backward) + 12 L T d for QK^T and AV over the full T x T."""
    return 6 * matmul_weights(L, d, V) + 12 * L * T * d


def hand_params(L: int, d: int, V: int, padded_V: int) -> int:
    """Every parameter of the model: the matmul weights, the position table and the padding rows of the token table."""
    return matmul_weights(L, d, V) + BLOCK * d + (padded_V - V) * d


class Spy:
    """What a bench.run actually ran: bench's clock replaced by one that advances only inside a step, by the
    duration the test chose for that step (fast and plain steps each from their own list, in call order), and
    the batches, attention kernel calls, logits dtype and fused AdamW kernel calls seen during the steps."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fast: list[float] | None = None,
                 plain: list[float] | None = None) -> None:
        self.now = 0.0
        self.durations = {"fast": list(fast or []), "plain": list(plain or [])}
        self.timed = fast is not None or plain is not None
        self.order: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        self.logits_dtypes: set[torch.dtype] = set()
        self.calls = {"sdpa": 0, "fused_adamw": 0}
        make_step, forward = bench.make_step, GPT.forward

        def spy_make_step(model, opt, cfg, device, plain, cudagraphs=False):
            step = make_step(model, opt, cfg, device, plain, cudagraphs)
            kind = "plain" if plain else "fast"

            def timed_step(x: torch.Tensor, y: torch.Tensor) -> object:
                out = step(x, y)
                self.order.append(kind)
                self.shapes.append(tuple(x.shape))
                if self.timed:
                    self.now += self.durations[kind].pop(0)
                return out
            return timed_step

        def spy_forward(model, *a, **k):
            out = forward(model, *a, **k)
            self.logits_dtypes.add(out[0].dtype)
            return out

        monkeypatch.setattr(bench, "make_step", spy_make_step)
        monkeypatch.setattr(GPT, "forward", spy_forward)
        self._count(monkeypatch, torch.nn.functional, "scaled_dot_product_attention", "sdpa")
        self._count(monkeypatch, torch, "_fused_adamw_", "fused_adamw")
        if self.timed:
            monkeypatch.setattr(bench, "time", self)

    def _count(self, monkeypatch: pytest.MonkeyPatch, owner: object, name: str, key: str) -> None:
        original = getattr(owner, name)

        def counted(*a, **k):
            self.calls[key] += 1
            return original(*a, **k)
        monkeypatch.setattr(owner, name, counted)

    def perf_counter(self) -> float:  # bench.time.perf_counter while timed
        return self.now

    def unused(self) -> dict[str, list[float]]:
        return {k: v for k, v in self.durations.items() if v}


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
    # of three step times, the min, median and max are the sorted three
    assert [res["step_ms_min"], res["step_ms_median"], res["step_ms_max"]] == sorted(res["step_ms"])
    assert res["mfu"] is None and res["peak_tflops"] is None  # no peak FLOP/s for a CPU
    assert res["ceiling_tflops"] > 0 and 0 < res["mfu_vs_ceiling"]
    assert res["memory_kind"] == "process_peak_rss" and res["peak_memory_bytes"] > 50 * 2**20
    assert res["compile"] is False and res["compile_s"] is None
    # tokens/s = the tokens of the 3 measured steps over the wall time around them, which holds the recorded step
    # times and next to nothing else: at most B*T*3 / their sum, and close to it
    from_steps = B * T * 3 / (sum(res["step_ms"]) / 1e3)
    assert 0.9 * from_steps <= res["tokens_per_s"] <= from_steps * (1 + 1e-9)
    # achieved FLOP/s and MFU vs the ceiling: the hand-counted FLOPs/token (vocab padded to 512, the 12 padding
    # rows not counted) x tokens/s
    flops = hand_flops_per_token(L, D, T, V)
    assert res["achieved_tflops"] * 1e12 == pytest.approx(flops * res["tokens_per_s"], rel=1e-9)
    assert res["mfu_vs_ceiling"] == pytest.approx(flops * res["tokens_per_s"] / (res["ceiling_tflops"] * 1e12),
                                                  rel=1e-9)
    # an untrained model on uniform random tokens predicts ~uniformly: loss ~ ln(vocab)
    assert res["loss_first"] == pytest.approx(math.log(500), abs=0.3)


def test_flops_per_token_formula() -> None:
    """Counted by hand, independently of model.py: 6 x (weights each token multiplies: 12 d^2 + 13 d per layer,
    the final norm, the unpadded output head) + 12 L T d for attention."""
    res = run_bench("--set", "vocab_size=1000")
    assert res["flops_per_token"] == hand_flops_per_token(L, D, T, 1000)
    assert res["params"] == hand_params(L, D, 1000, 1024)  # vocab padded to a multiple of 64: 24 padding rows


def test_tokens_per_s_and_mfu_from_the_step_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps that take known times (bench's clock advanced by the test inside each step): tokens/s = B*T*steps
    over the measured steps' total, the warm-up steps excluded; the step-time statistics and first_step_s are
    those times; MFU = hand-counted FLOPs/token x tokens/s / the --peak-tflops peak."""
    spy = Spy(monkeypatch, fast=[8.0, 4.0, 0.5, 0.25, 0.25])  # 2 warm-up steps, then 3 measured: 1 s in all
    res = run_bench("--warmup", "2", "--peak-tflops", "1e-4")
    assert not spy.unused() and spy.shapes == [(B, T)] * 5
    assert res["tokens_per_s"] == B * T * 3 / 1.0
    assert res["step_ms"] == [500.0, 250.0, 250.0]
    assert (res["step_ms_median"], res["step_ms_min"], res["step_ms_max"]) == (250.0, 250.0, 500.0)
    assert res["first_step_s"] == 8.0 and res["compile_s"] is None  # eager: no compile time
    flops = hand_flops_per_token(L, D, T, V)
    assert res["achieved_tflops"] == pytest.approx(flops * 96 / 1e12, rel=1e-12)
    assert res["peak_tflops"] == pytest.approx(1e-4) and res["mfu"] == pytest.approx(flops * 96 / 1e8, rel=1e-12)


def spied_run(monkeypatch: pytest.MonkeyPatch, *extra: str) -> tuple[dict, Spy]:
    with monkeypatch.context() as m:
        spy = Spy(m)
        return run_bench(*extra), spy


def test_plain_loop_is_the_unpadded_foreach_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """--plain runs the model with the unpadded vocab (the hand-counted parameters) and foreach AdamW (torch's
    fused kernel never runs), and so gives the same losses as the fast loop with those two switched off (TF32 and
    pinned copies, its other differences, do not apply on a CPU)."""
    plain, spy = spied_run(monkeypatch, "--plain")
    assert plain["params"] == hand_params(L, D, V, V) and spy.calls["fused_adamw"] == 0
    ref, _ = spied_run(monkeypatch, "--pad-vocab", "off", "--fused-adamw", "off")
    assert (plain["loss_first"], plain["loss_last"]) == pytest.approx((ref["loss_first"], ref["loss_last"]), rel=1e-6)


def test_switches_change_what_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a reference run (unpadded vocab, foreach AdamW, SDPA, fp32), each switch changes what runs, and
    the losses stay those of the reference to the switch's tolerance: the same weights and batches give the same
    first loss, exactly up to fp32 rounding except under bf16 autocast."""
    ref, spy = spied_run(monkeypatch, "--pad-vocab", "off", "--fused-adamw", "off")
    steps = 1 + 3  # warm-up + measured
    assert ref["params"] == hand_params(L, D, V, V) and spy.shapes == [(B, T)] * steps
    assert spy.calls == {"sdpa": L * steps, "fused_adamw": 0} and spy.logits_dtypes == {torch.float32}

    # vocab padded to 512 (the default): 12 more rows in the token table; initialised from more random draws,
    # the weights differ, so the first loss is only ~ln(vocab) as for any untrained model
    res, _ = spied_run(monkeypatch)
    assert res["params"] == hand_params(L, D, V, 512) and res["loss_first"] == pytest.approx(math.log(V), abs=0.3)
    # fused AdamW: torch's fused kernel runs at every step, once per parameter group (decay, no decay); 4 steps
    # match foreach AdamW to 1e-4
    res, spy = spied_run(monkeypatch, "--pad-vocab", "off", "--fused-adamw", "on")
    assert spy.calls["fused_adamw"] == 2 * steps and res["loss_first"] == pytest.approx(ref["loss_first"], rel=1e-6)
    assert res["loss_last"] == pytest.approx(ref["loss_last"], rel=1e-4)
    # manual attention: no SDPA call, the textbook formula gives SDPA's loss
    res, spy = spied_run(monkeypatch, "--pad-vocab", "off", "--fused-adamw", "off", "--attention", "manual")
    assert spy.calls["sdpa"] == 0 and res["loss_first"] == pytest.approx(ref["loss_first"], rel=1e-5)
    # bf16 autocast: bf16 logits, a loss off fp32's by bf16 rounding only
    res, spy = spied_run(monkeypatch, "--pad-vocab", "off", "--fused-adamw", "off", "--dtype", "bf16")
    assert spy.logits_dtypes == {torch.bfloat16}
    assert res["loss_first"] == pytest.approx(ref["loss_first"], rel=1e-2) and res["loss_first"] != ref["loss_first"]


def test_vs_plain_alternates_fast_and_plain_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast and plain steps of known times (bench's clock advanced inside each step by the test): the steps
    alternate A B, B A, ...; the ratios are plain / fast per pair, and their median and quartiles are those of
    the 8 chosen ratios, sorted 0.5 1 1 2 3 4 4 6 (quartiles 1 and 4 by any usual definition, median 2.5, which
    is not the ratio of the median step times, 500 / 250 ms)."""
    fast = [0.25, 0.5, 0.25, 0.125, 0.5, 0.25, 0.125, 0.25]
    ratios = [2, 0.5, 4, 1, 3, 6, 4, 1]
    plain = [f * r for f, r in zip(fast, ratios)]
    spy = Spy(monkeypatch, fast=[1.0] + [0.25] * 8 + fast, plain=[1.0] + plain)  # each: warm-up, then measured
    res = run_bench("--vs-plain", "--steps", "8")
    assert not spy.unused()
    assert spy.order[9:] == ["plain"] + ["fast", "plain", "plain", "fast"] * 4  # plain warm-up, then the pairs
    assert res["tokens_per_s"] == B * T * 8 / 2.0  # the main run's 8 measured steps of 0.25 s
    assert res["vs_plain"] == pytest.approx({
        "pairs": 8, "fast_ms_median": 250.0, "plain_ms_median": 500.0, "ratio_median": 2.5,
        "ratio_q1": 1.0, "ratio_q3": 4.0, "ratio_min": 0.5, "ratio_max": 6.0}, rel=1e-12)
    monkeypatch.undo()  # the real clock again
    assert run_bench()["vs_plain"] is None


def test_ceiling_tflops_is_taken_not_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """--ceiling-tflops X: MFU against X, and no matmul is timed (even with --measure-ceiling)."""
    monkeypatch.setattr(bench.common, "measure_matmul_tflops", lambda *a, **k: pytest.fail("ceiling was measured"))
    Spy(monkeypatch, fast=[1.0, 0.5, 0.25, 0.25])  # 1 warm-up step, then 3 measured: 1 s, B*T*3 = 96 tokens
    res = run_bench("--ceiling-tflops", "2.5", "--measure-ceiling")
    assert res["ceiling_tflops"] == 2.5
    assert res["mfu_vs_ceiling"] == pytest.approx(hand_flops_per_token(L, D, T, V) * 96 / 2.5e12, rel=1e-12)


def test_config_file_sets_model_and_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The config's model (GPT-2's vocab and block size, 1 layer of width 32), batch shape and dtype (bf16, not
    the CPU's default fp32) are what runs: the batches fed to the steps, the hand-counted parameters and
    FLOPs/token, the dtype of the logits."""
    cfg = tmp_path / "cfg.py"
    cfg.write_text("model = 'gpt2'\nmodel_overrides = {'n_layer': 1, 'n_head': 2, 'n_embd': 32}\n"
                   "micro_batch = 3\nseq_len = 8\ndtype = 'bf16'\nmax_tokens = 1000\nlr = 1e-3\n")
    spy = Spy(monkeypatch, fast=[0.5, 0.5])
    res = bench.run(bench.parse_args([str(cfg), "--steps", "2", "--warmup", "0", "--device", "cpu"]))
    assert spy.shapes == [(3, 8)] * 2 and res["tokens_per_s"] == 3 * 8 * 2 / 1.0
    assert res["params"] == hand_params(1, 32, 50257, 50304)  # GPT-2's vocab padded to a multiple of 64
    assert res["flops_per_token"] == hand_flops_per_token(1, 32, 8, 50257)
    assert spy.logits_dtypes == {torch.bfloat16}
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
