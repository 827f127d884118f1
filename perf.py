"""Fast-path helpers for bench.py (and train.py): the TF32 switch, the autocast context, AdamW construction
(fused on CUDA), pinned non-blocking host->device copies, a measured matmul ceiling and MFU. The peak-FLOPs
table lives in train.py (`peak_flops`). perf.py imports nothing from train.py, so train.py can import it.

Every fast path here is a switch with a plain alternative, and tests/test_fast_paths.py checks that both give
the same numbers (to the tolerance of the dtype involved)."""

from __future__ import annotations

import contextlib
import inspect
import time

import torch

from errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def configure_backends(tf32: bool = True) -> None:
    """TF32 for fp32 matmuls on Ampere and newer GPUs (10-bit mantissa inputs, fp32 accumulation); under bf16
    autocast it only affects the ops autocast keeps in fp32. Pass tf32=False on CPU: in recent torch the same
    switch lets oneDNN use reduced precision on CPUs with AMX. set_float32_matmul_precision is used (not the
    newer fp32_precision flags) because torch refuses to mix those with the legacy allow_tf32 flags."""
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32


def autocast_context(device_type: str, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed-precision region for the forward pass; fp32 means no autocast at all."""
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is unknown; choose one of {sorted(DTYPES)}")
    if dtype == "fp32":
        return contextlib.nullcontext()
    if dtype == "fp16" and device_type == "cpu":
        raise UserError("fp16 autocast is for CUDA; use --dtype bf16 or fp32 on CPU")
    return torch.autocast(device_type=device_type, dtype=DTYPES[dtype])


def fused_adamw_available(device_type: str) -> bool:
    """Fused AdamW (one kernel for all parameters) exists for CUDA tensors in torch >= 2.0; CPU since 2.4."""
    return "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")


def make_adamw(
    groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over param groups (train.param_groups: decay on >= 2-D weights only). fused=None picks the fused
    kernel (one launch for all parameters instead of a few per tensor group) on CUDA, the default elsewhere."""
    device_type = groups[0]["params"][0].device.type
    if fused is None:
        fused = device_type == "cuda" and fused_adamw_available(device_type)
    if fused and not fused_adamw_available(device_type):
        raise UserError(f"fused AdamW is not available for {device_type} in torch {torch.__version__}")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **({"fused": True} if fused else {}))


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device copy that does not block the CPU: from pinned (page-locked) memory with
    non_blocking=True the copy is queued on the stream and overlaps the previous step's kernels."""
    if device.type == "cuda":
        if not x.is_pinned():
            x = x.pin_memory()
        return x.to(device, non_blocking=True)
    return x.to(device)


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int | None = None,
                          iters: int | None = None) -> float:
    """Achieved TFLOP/s of an n x n x n matmul: the practical ceiling MFU can be compared with.
    CUDA: n=8192, 100 matmuls timed by two CUDA events after 10 untimed ones (host launch gaps do not count);
    CPU: n=1024, 5 matmuls timed by the host clock. The output buffer is reused, so no allocation is timed."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    iters = iters or (100 if cuda else 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(10 if cuda else 1):
        torch.matmul(a, b, out=out)
    sync(device)
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        seconds = time.perf_counter() - t0
    return 2 * n**3 * iters / seconds / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (None when the peak is unknown)."""
    return flops_per_token * tokens_per_s / peak_flops if peak_flops else None
