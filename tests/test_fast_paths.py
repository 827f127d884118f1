"""Each fast path gives the same numbers as the plain path it replaces.

References are the plain PyTorch paths (eager model, foreach AdamW, unpadded vocab, manual attention, fp32
matmuls) and torch.utils.flop_counter for the FLOPs count. Tests marked cuda skip without a GPU;
scripts/gpu_check.py runs them on one (pytest -m cuda)."""

from __future__ import annotations

import collections
import copy
from collections.abc import Callable

import pytest
import torch

import common
import optim
from model import GPT, GPTConfig
from optim import param_groups

needs_cuda = pytest.mark.cuda  # skipped without a GPU (conftest.py)
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
        with common.autocast_context(torch.device(device).type, dtype):
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


def torch_can_fuse_adamw(device: str) -> bool:
    """Whether torch's own AdamW(fused=True) takes a step on a tensor of this device: asked of torch directly, the
    reference for optim's "fused wherever torch has the kernel" (not optim.fused_adamw_available)."""
    p = torch.nn.Parameter(torch.ones(4, device=device))
    p.grad = torch.full_like(p, 0.5)
    try:
        torch.optim.AdamW([p], lr=0.1, fused=True).step()
    except (TypeError, RuntimeError, ValueError):  # no fused argument / no fused kernel for this device
        return False
    return bool((p.detach() < 1).all())


@pytest.mark.parametrize("device", DEVICES)
def test_fused_adamw_matches_foreach(device: str) -> None:
    if not torch_can_fuse_adamw(device):
        pytest.skip(f"torch {torch.__version__} has no fused AdamW for {device}")
    torch.manual_seed(0)
    cfg = tiny()
    a = GPT(cfg).to(device)
    b = copy.deepcopy(a)
    opt_a = optim.make_adamw(param_groups(a, 0.1), lr=1e-3, fused=False)
    opt_b = optim.make_adamw(param_groups(b, 0.1), lr=1e-3, fused=True)
    assert opt_b.defaults["fused"] and not opt_a.defaults.get("fused")
    la = train_steps(a, opt_a, cfg, 4, device)
    lb = train_steps(b, opt_b, cfg, 4, device)
    assert la[0] == pytest.approx(lb[0], rel=1e-6)
    assert la == pytest.approx(lb, rel=1e-4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5)
    assert la[-1] < la[0]  # the optimizer did train


def test_make_adamw_default_is_fused_where_available(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fused wherever torch has it: train_step relies on it to skip a non-finite update on the device. The
    reference is torch itself (torch_can_fuse_adamw: AdamW(fused=True) stepping a CPU tensor): make_adamw's
    default and the optimizer train.py builds (optim.build_optimizer) say fused and run torch's fused kernel
    exactly then, and two steps of each equal torch's single-tensor AdamW with GPT-2's decay groups written
    out here (decay on >= 2-D weights only) at the config's lr, betas, eps and weight decay."""
    from train_config import TrainConfig

    fusable = torch_can_fuse_adamw("cpu")
    cfg = TrainConfig(max_steps=1)
    torch.manual_seed(0)
    model = GPT(tiny())
    _, loss = model(*batch(tiny()))
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    ref, built = copy.deepcopy(model), copy.deepcopy(model)
    decay = [p for p in ref.parameters() if p.dim() >= 2]
    no_decay = [p for p in ref.parameters() if p.dim() < 2]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False, fused=False)
    opts = {"make_adamw": (model, optim.make_adamw(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                                   betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)),
            "build_optimizer": (built, optim.build_optimizer(cfg, common.Dist(device=torch.device("cpu")), built)),
            "reference": (ref, ref_opt)}
    kernel_calls: list[int] = []
    fused_kernel = torch._fused_adamw_

    def counted(*a: object, **k: object) -> object:
        kernel_calls.append(1)
        return fused_kernel(*a, **k)

    monkeypatch.setattr(torch, "_fused_adamw_", counted)
    fused_calls = {}
    for name, (m, opt) in opts.items():
        kernel_calls.clear()
        for _ in range(2):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            opt.step()
        fused_calls[name] = len(kernel_calls)
    monkeypatch.undo()
    for name in ("make_adamw", "build_optimizer"):
        m, opt = opts[name]
        assert bool(opt.defaults.get("fused")) == fusable, name
        assert (fused_calls[name] > 0) == fusable, (name, fused_calls)
        for p, r in zip(m.parameters(), ref.parameters()):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-8)
    assert fused_calls["reference"] == 0
    assert not torch.equal(ref.transformer.ln_f.weight, model.transformer.ln_f.weight.new_ones(32))  # it stepped


@needs_cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_autocast_loss_close_to_fp32_on_cuda(dtype: str) -> None:
    torch.manual_seed(0)
    model = GPT(tiny()).cuda()
    x, y = batch(tiny(), device="cuda")
    ref = model(x, y)[1]
    with common.autocast_context("cuda", dtype):
        logits, loss = model(x, y)
    assert logits.dtype == common.DTYPES[dtype] and loss.dtype == torch.float32  # loss computed in fp32
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)


def test_tf32_off_gives_full_fp32_matmuls() -> None:
    """configure_backends(tf32=False), as train.py calls it on CPU and bench.py with --no-tf32 / --plain, also
    after tf32=True (--vs-plain toggles it per step): fp32 matmuls as the model runs them (matmul, linear,
    batched) equal a float64 reference to fp32 accuracy, which TF32 or bf16 inputs (10- / 7-bit mantissas) miss
    by 10x and more. tf32=True turns on the flags cuBLAS and cuDNN read (test_tf32_matmul_close_to_fp32 runs
    TF32 on a GPU)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 1024, generator=g), torch.randn(1024, 256, generator=g)
    ref = a.double() @ b.double()  # entries ~ N(0, 1024): |x| up to ~100
    try:
        common.configure_backends(tf32=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        common.configure_backends(tf32=False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        outs = [a @ b, torch.nn.functional.linear(a, b.T.contiguous()), torch.bmm(a[None], b[None])[0]]
    finally:
        common.configure_backends(tf32=False)
    for out in outs:
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-3)


@needs_cuda
def test_tf32_matmul_close_to_fp32() -> None:
    a, b = torch.randn(512, 512, device="cuda"), torch.randn(512, 512, device="cuda")
    try:
        common.configure_backends(tf32=False)
        ref = a @ b
        common.configure_backends(tf32=True)
        fast = a @ b
    finally:
        common.configure_backends(tf32=False)
    torch.testing.assert_close(fast, ref, rtol=1e-2, atol=5e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_to_device_copies_exactly(device: str) -> None:
    x = torch.randint(0, 50257, (4, 64))
    out = common.to_device(x[:, 1:], torch.device(device))  # a non-contiguous view, as a loader yields
    common.sync(torch.device(device))
    assert out.device.type == device and torch.equal(out.cpu(), x[:, 1:])


def _train_step(device: str, dtype: str = "fp32"):
    """train.train_step on a tiny model, as train.py and bench.py call it: one micro-batch per step."""
    from train import train_step

    torch.manual_seed(0)
    model = GPT(tiny()).to(device)
    opt = optim.make_adamw(param_groups(model, 0.1), lr=1e-3)
    scaler = torch.amp.GradScaler(device, enabled=dtype == "fp16")
    autocast = common.autocast_context(device, dtype)
    x, y = batch(tiny(), device=device)
    return (lambda: train_step(model, opt, scaler, lambda: (x, y), 1, autocast, 1.0)), model, opt


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")


def on_host_reads(monkeypatch: pytest.MonkeyPatch, before_read: Callable[[str], None],
                  names: tuple[str, ...] = HOST_READS) -> None:
    """Call before_read(name) ahead of every host read of a tensor (.item / .tolist / bool / float / int)."""
    def wrapped(name: str) -> Callable[..., object]:
        original = getattr(torch.Tensor, name)

        def read(t: torch.Tensor, *a: object, **k: object) -> object:
            before_read(name)
            return original(t, *a, **k)
        return read

    for name in names:
        monkeypatch.setattr(torch.Tensor, name, wrapped(name))


def refuse_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str) -> None:
        raise AssertionError(f"Tensor.{name}() inside the step")
    on_host_reads(monkeypatch, refuse)


def test_train_step_reads_nothing_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """train_step never asks for a value on the host (.item / .tolist / bool): on CUDA that would stall the CPU
    until the GPU catches up. test_train_step_has_no_cuda_sync checks the same on a GPU."""
    step, _, opt = _train_step("cpu")
    first = step().loss  # creates the optimizer state
    refuse_host_reads(monkeypatch)
    results = [step() for _ in range(2)]
    monkeypatch.undo()
    assert all(isinstance(r.loss, torch.Tensor) and bool(r.finite) for r in results)
    assert float(results[1].loss) < float(first)  # the steps did train


def test_train_step_skips_a_non_finite_update_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN loss: the fused kernel leaves weights, both moments and the step count untouched, with no host read."""
    step, model, opt = _train_step("cpu")
    step()
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    forward = GPT.forward

    def nan_forward(self, *a, **k):
        logits, loss, *aux = forward(self, *a, **k)
        return logits, loss * float("nan"), *aux

    monkeypatch.setattr(GPT, "forward", nan_forward)
    refuse_host_reads(monkeypatch)
    r = step()
    monkeypatch.undo()
    assert not bool(r.finite)
    weights, state = before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    for k, s in state["state"].items():
        assert all(torch.equal(t, opt.state_dict()["state"][k][n]) for n, t in s.items())
    assert step().finite  # and the next good step trains again


def test_train_loop_reads_the_device_only_at_log_steps(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.train with log_interval=4: host reads happen at steps 0, 4, 8 and the last one, never between."""
    import train
    from _shards import markov_dataset
    from train_config import load_config

    data = markov_dataset(tmp_path / "data")
    cfg = load_config([f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", "--model_overrides.n_layer=1",
                       "--model_overrides.n_head=2", "--model_overrides.n_embd=16", "--model_overrides.vocab_size=64",
                       "--model_overrides.block_size=16", "--micro_batch=2", "--seq_len=16",
                       "--total_batch_tokens=64", "--max_steps=10", "--warmup_steps=2", "--eval_interval=0",
                       "--ckpt_interval=0", "--log_interval=4", "--dtype=fp32", "--device=cpu"])
    current = {"step": None}
    reads: collections.Counter = collections.Counter()  # host reads by the step that was running
    lr_at = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, *a: current.update(step=step) or lr_at(step, *a))
    # int() is left out: the loader checks token ids with int(batch.max()) on the host batch, before its copy
    # to the device
    on_host_reads(monkeypatch, lambda name: reads.update([current["step"]]),
                  names=("item", "tolist", "__bool__", "__float__"))
    result = train.train(cfg)
    monkeypatch.undo()
    assert result["step"] == 10 and len(result["losses"]) == 10
    assert sorted(s for s in reads if s is not None) == [0, 4, 8, 9], reads


@needs_cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_train_step_has_no_cuda_sync(dtype: str) -> None:
    step, _, _ = _train_step("cuda", dtype)
    step()  # first step: lazy optimizer-state init, allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.e2e
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
    opt_e = optim.make_adamw(param_groups(eager, 0.1), lr=1e-3)
    opt_c = optim.make_adamw(param_groups(compiled_raw, 0.1), lr=1e-3)
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


@needs_cuda
def test_matmul_ceiling_is_below_the_datasheet_peak() -> None:
    """The CUDA-event timing of common.measure_matmul_tflops against an independent host-clock timing of the same
    matmuls, and against the datasheet: a timer that missed kernels or a FLOP count off by 2x would exceed it."""
    import time

    device = torch.device("cuda")
    measured = common.measure_matmul_tflops(device, torch.bfloat16, n=4096, iters=100)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(100):
        a @ b
    torch.cuda.synchronize()
    host = 2 * 4096**3 * 100 / (time.perf_counter() - t0) / 1e12
    assert 0.7 * host <= measured <= 1.5 * host
    peak = common.peak_flops(device)
    if peak:
        assert measured <= peak / 1e12


# Names as torch.cuda.get_device_name() reports them, with the dense bf16 datasheet peak of each.
GPU_NAMES = {
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-PCIE-40GB": 312e12, "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12, "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12,
    "NVIDIA L4": 121e12, "NVIDIA L40S": 362e12, "NVIDIA GeForce RTX 4090": 165e12, "NVIDIA A10G": 125e12,
    "Tesla V100-SXM2-16GB": 125e12, "NVIDIA GeForce RTX 3090": 71e12, "NVIDIA B200": 0.0,
}


@pytest.mark.parametrize("name", sorted(GPU_NAMES))
def test_datasheet_peak_matches_the_most_specific_name(name: str) -> None:
    """"L40S" must not match "L4", nor "H100 NVL" the SXM "H100"; an unknown GPU has no peak (no MFU)."""
    assert common.datasheet_peak_flops(name) == GPU_NAMES[name]


def test_resume_moves_adamw_step_back_to_the_parameter_device() -> None:
    """ZeroRedundancyOptimizer.load_state_dict puts 0-dim state (AdamW's step) on the CPU; the fused CUDA kernel
    needs it on the parameter's device. Parameters on the meta device stand in for CUDA ones here."""
    from train import load_optimizer_state

    p = torch.nn.Parameter(torch.zeros(3, device="meta"))
    opt = torch.optim.AdamW([p], lr=1e-3)
    moments = {"exp_avg": torch.zeros(3, device="meta"), "exp_avg_sq": torch.zeros(3, device="meta")}
    state = {"state": {0: {"step": torch.tensor(5.0), **moments}}, "param_groups": opt.state_dict()["param_groups"]}
    load_optimizer_state(opt, state)
    assert opt.state[p]["step"].device.type == "meta"


def test_zero1_uses_flat_bucket_views(tmp_path) -> None:
    """train.build_optimizer under a (one-rank gloo) process group: ZeRO-1, fused AdamW, parameter buckets."""
    import torch.distributed as dist

    from train import build_optimizer
    from train_config import TrainConfig

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        opt = build_optimizer(TrainConfig(max_steps=1, zero1=True), common.Dist(device=torch.device("cpu")),
                              GPT(tiny()))
        assert type(opt).__name__ == "ZeroRedundancyOptimizer" and opt.parameters_as_bucket_view
        assert bool(opt.optim.defaults.get("fused")) == torch_can_fuse_adamw("cpu")
    finally:
        dist.destroy_process_group()
