"""Each fast path gives the same numbers as the plain path it replaces.

References are the plain PyTorch paths (eager model, foreach AdamW, unpadded vocab, manual attention, fp32
matmuls) and torch.utils.flop_counter for the FLOPs count. Tests marked cuda skip without a GPU;
scripts/gpu_check.sh runs them on one."""

from __future__ import annotations

import copy

import pytest
import torch

import perf
from model import GPT, GPTConfig
from train import param_groups

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (scripts/gpu_check.sh runs these)")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def tiny(**kw: object) -> GPTConfig:
    base = dict(vocab_size=300, n_layer=2, n_head=2, n_embd=32, block_size=64)
    return GPTConfig(**{**base, **kw})


def batch(cfg: GPTConfig, B: int = 2, T: int = 32, seed: int = 0, device: str = "cpu") -> tuple:
    g = torch.Generator().manual_seed(seed)
    buf = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    return buf[:, :-1].to(device), buf[:, 1:].to(device)


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: GPTConfig, n: int, device: str = "cpu",
                dtype: str = "fp32") -> list[float]:
    losses = []
    for i in range(n):
        x, y = batch(cfg, seed=i, device=device)
        with perf.autocast_context(torch.device(device).type, dtype):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_padded_vocab_gives_same_logits_loss_and_grads() -> None:
    """pad_vocab_multiple=64: extra embedding rows that are never looked up nor predicted."""
    torch.manual_seed(0)
    plain = GPT(tiny())
    padded = GPT(tiny(pad_vocab_multiple=64))
    assert padded.transformer.wte.weight.shape[0] == 320
    state = plain.state_dict()
    padded_state = padded.state_dict()
    for k, v in state.items():
        if k in ("transformer.wte.weight", "lm_head.weight"):
            padded_state[k][: v.shape[0]] = v
        else:
            padded_state[k] = v
    padded.load_state_dict(padded_state)
    x, y = batch(tiny())
    la, lossa = plain(x, y)
    lb, lossb = padded(x, y)
    assert lb.shape == la.shape  # the padded rows are cut off
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lossb, lossa, rtol=1e-6, atol=1e-6)
    lossa.backward()
    lossb.backward()
    ga, gb = plain.transformer.wte.weight.grad, padded.transformer.wte.weight.grad
    torch.testing.assert_close(gb[:300], ga, rtol=1e-5, atol=1e-6)
    assert gb[300:].abs().max() == 0  # padding rows get no gradient


@pytest.mark.parametrize("device", DEVICES)
def test_fused_adamw_matches_foreach(device: str) -> None:
    if not perf.fused_adamw_available(device):
        pytest.skip(f"fused AdamW is not available on {device} in torch {torch.__version__}")
    torch.manual_seed(0)
    cfg = tiny()
    a = GPT(cfg).to(device)
    b = copy.deepcopy(a)
    opt_a = perf.make_adamw(param_groups(a, 0.1), lr=1e-3, fused=False)
    opt_b = perf.make_adamw(param_groups(b, 0.1), lr=1e-3, fused=True)
    assert opt_b.defaults["fused"] and not opt_a.defaults.get("fused")
    la = train_steps(a, opt_a, cfg, 4, device)
    lb = train_steps(b, opt_b, cfg, 4, device)
    assert la[0] == pytest.approx(lb[0], rel=1e-6)
    assert la == pytest.approx(lb, rel=1e-4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5)
    assert la[-1] < la[0]  # the optimizer did train


def test_make_adamw_default_is_fused_only_on_cuda() -> None:
    opt = perf.make_adamw(param_groups(GPT(tiny()), 0.1), lr=1e-3)
    assert not opt.defaults.get("fused")
    # weight decay on matrices only: biases and LayerNorm gains are in the no-decay group
    assert all(p.dim() >= 2 for p in opt.param_groups[0]["params"]) and opt.param_groups[0]["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in opt.param_groups[1]["params"]) and opt.param_groups[1]["weight_decay"] == 0.0


@needs_cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_autocast_loss_close_to_fp32_on_cuda(dtype: str) -> None:
    torch.manual_seed(0)
    model = GPT(tiny()).cuda()
    x, y = batch(tiny(), device="cuda")
    ref = model(x, y)[1]
    with perf.autocast_context("cuda", dtype):
        logits, loss = model(x, y)
    assert logits.dtype == perf.DTYPES[dtype] and loss.dtype == torch.float32  # loss computed in fp32
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)


def test_tf32_switch() -> None:
    try:
        perf.configure_backends(tf32=True)
        assert torch.get_float32_matmul_precision() == "high"
        perf.configure_backends(tf32=False)
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        perf.configure_backends(tf32=False)


@needs_cuda
def test_tf32_matmul_close_to_fp32() -> None:
    a, b = torch.randn(512, 512, device="cuda"), torch.randn(512, 512, device="cuda")
    try:
        perf.configure_backends(tf32=False)
        ref = a @ b
        perf.configure_backends(tf32=True)
        fast = a @ b
    finally:
        perf.configure_backends(tf32=False)
    torch.testing.assert_close(fast, ref, rtol=1e-2, atol=5e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_to_device_copies_exactly(device: str) -> None:
    x = torch.randint(0, 50257, (4, 64))
    out = perf.to_device(x[:, 1:], torch.device(device))  # a non-contiguous view, as a loader yields
    perf.sync(torch.device(device))
    assert out.device.type == device and torch.equal(out.cpu(), x[:, 1:])


def _bench_step(device: str, dtype: str = "fp32"):
    import bench
    from train import TrainConfig

    cfg = TrainConfig(micro_batch=2, seq_len=32, dtype=dtype, max_steps=1)
    torch.manual_seed(0)
    model = GPT(tiny()).to(device)
    opt = perf.make_adamw(param_groups(model, 0.1), lr=1e-3)
    return bench.make_step(model, opt, cfg, torch.device(device), plain=False), opt, tiny()


def test_fast_step_reads_nothing_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The measured step never asks for a value on the host (.item / .tolist / bool): on CUDA that would
    stall the CPU until the GPU catches up. test_fast_step_has_no_cuda_sync checks the same on a GPU."""
    step, opt, cfg = _bench_step("cpu")
    x, y = batch(cfg)
    first = step(x, y)  # creates the optimizer state
    # Non-capturable AdamW keeps its step counters on the host even for CUDA params: reading them is free.
    host_counters = {id(s["step"]) for s in opt.state.values()}
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__float__")}

    def refusing(name: str):
        def read(t: torch.Tensor, *a: object, **k: object) -> object:
            if id(t) not in host_counters:
                raise AssertionError(f"Tensor.{name}() inside the step")
            return originals[name](t, *a, **k)
        return read

    for name in originals:
        monkeypatch.setattr(torch.Tensor, name, refusing(name))
    losses = [step(x, y) for _ in range(2)]
    monkeypatch.undo()
    assert all(isinstance(v, torch.Tensor) for v in losses)
    assert float(losses[1]) < float(first)  # the steps did train


@needs_cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_fast_step_has_no_cuda_sync(dtype: str) -> None:
    step, _, cfg = _bench_step("cuda", dtype)
    x, y = batch(cfg, device="cuda")
    step(x, y)  # first step: lazy optimizer-state init, allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compiled_equals_eager(device: str, dtype: str) -> None:
    """torch.compile gives the eager losses and weights through a few optimizer steps (fp32: ~1e-5; bf16:
    bf16 rounding), and with fixed (B, T) shapes it compiles once: no recompilation, so CUDA graphs
    (compile mode reduce-overhead) can replay the step."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = tiny()
    eager = GPT(cfg).to(device)
    compiled_raw = copy.deepcopy(eager)
    compiled = torch.compile(compiled_raw)
    opt_e = perf.make_adamw(param_groups(eager, 0.1), lr=1e-3)
    opt_c = perf.make_adamw(param_groups(compiled_raw, 0.1), lr=1e-3)
    tol = dict(rel=1e-4) if dtype == "fp32" else dict(rel=2e-2)
    le = train_steps(eager, opt_e, cfg, 3, device, dtype)
    with torch._dynamo.config.patch(error_on_recompile=True):
        lc = train_steps(compiled, opt_c, cfg, 3, device, dtype)
    assert lc == pytest.approx(le, **tol)
    ptol = dict(rtol=1e-4, atol=1e-5) if dtype == "fp32" else dict(rtol=5e-2, atol=5e-3)
    for pe, pc in zip(eager.parameters(), compiled_raw.parameters()):
        torch.testing.assert_close(pc, pe, **ptol)


def test_flops_per_token_matches_torch_flop_counter() -> None:
    """model.estimate_flops_per_token (6N + 12·L·T·d) against torch's own count of one forward+backward.
    Manual attention so the T x T matmuls show up as bmm; N includes biases and norm gains, which are not
    matmuls, hence the estimate is slightly (< 2%) above the count."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = tiny(vocab_size=256, n_embd=64, block_size=256, attention="manual")
    model = GPT(cfg)
    B, T = 2, 256
    x, y = batch(cfg, B=B, T=T)
    counter = FlopCounterMode(display=False)
    with counter:
        _, loss = model(x, y)
        loss.backward()
    counted = counter.get_total_flops()
    estimate = model.estimate_flops_per_token(T) * B * T
    assert counted <= estimate <= 1.02 * counted
