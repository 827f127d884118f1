"""What training, benchmarking and evaluation share: distributed setup, autocast, host->device copies, RNG
capture, and the FLOP/s figures behind MFU. (The optimizers are optim.py's.)

Every fast path here is a switch with a plain alternative; tests/test_fast_paths.py checks that both give
the same numbers (to the tolerance of the dtype involved).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# ----------------------------------------------------------------------------------------------------
# Devices and processes


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto", backend: str = "auto", timeout_s: float = 600.0) -> Dist:
    """Single process unless torchrun set RANK / WORLD_SIZE; then one device per process and a process group
    (nccl on CUDA, gloo on CPU, unless `backend` says otherwise). device: auto | cpu | cuda | cuda:N."""
    if "RANK" not in os.environ:
        if device == "auto":
            return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return Dist(device=torch.device(device))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    backend = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        kw: dict[str, Any] = {}
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart != "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # after a torchrun --max_restarts restart, the agent's store still holds the failed attempt's
            # addresses under the same keys (gloo then connects to dead ports): give each attempt its own keys
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=False, timeout=timeout)
            kw = {"store": dist.PrefixStore(f"restart_{restart}", store), "rank": rank, "world_size": world}
        dist.init_process_group(backend=backend, device_id=dev if use_cuda else None, timeout=timeout, **kw)
    return Dist(rank, local_rank, world, dev)


def configure_backends(tf32: bool = True) -> None:
    """TF32 for fp32 matmuls on Ampere and newer GPUs (10-bit mantissa inputs, fp32 accumulation); under bf16
    autocast it only affects the ops autocast keeps in fp32. Pass tf32=False on CPU: in recent torch the same
    switch lets oneDNN use reduced precision on CPUs with AMX. set_float32_matmul_precision is used (not the
    newer fp32_precision flags) because torch refuses to mix those with the legacy allow_tf32 flags."""
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32


def autocast_context(device_type: str, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed-precision region for the forward pass (bf16 | fp16 | fp32, or torch's names); fp32: none."""
    dtype = _DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is unknown; choose one of {sorted(DTYPES)}")
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[dtype])


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device copy that does not block the CPU: from pinned (page-locked), contiguous memory with
    non_blocking=True the copy is queued on the stream and overlaps the previous step's kernels. (A pageable
    or strided source makes non_blocking a plain blocking copy.)"""
    if device.type == "cuda":
        if not x.is_pinned():
            x = x.contiguous().pin_memory()
        return x.to(device, non_blocking=True)
    return x.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device, world_size: int = 1) -> dict:
    """What a run ran on (recorded in metrics.jsonl at each launch, shown by report.py): the host CPU, the
    accelerator this process uses, the process and node counts, and the software versions."""
    cpu = platform.processor() or platform.machine()
    try:  # Linux names the CPU model here; platform.processor() is often just the architecture
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    cuda = device.type == "cuda"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cpu_count": cores, "torch_threads": torch.get_num_threads(), "device": device.type,
            "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "gpus_visible": torch.cuda.device_count() if cuda else 0,
            "world_size": world_size, "nodes": max(1, world_size // max(1, per_node)),
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "python": platform.python_version(), "os": platform.platform()}


# ----------------------------------------------------------------------------------------------------
# RNG state (checkpointed per rank, so a resumed run draws the same dropout masks)


def rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# ----------------------------------------------------------------------------------------------------
# FLOP/s: datasheet peaks, a measured ceiling, MFU

# Dense bf16 tensor-core peak FLOP/s (vendor datasheets, without sparsity), matched against
# torch.cuda.get_device_name(). Ordered most specific first: "L40S" must not match "L4", "H100 NVL" must not
# match "H100".
PEAK_BF16_FLOPS = (
    ("H200 NVL", 835e12), ("H200", 989e12),
    ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
    ("A100", 312e12), ("A10G", 125e12), ("L40S", 362e12), ("L4", 121e12),
    ("4090", 165e12), ("3090", 71e12), ("V100", 125e12),
)


def datasheet_peak_flops(device_name: str) -> float:
    """The bf16 peak of a GPU by its CUDA name, 0.0 when unknown."""
    return next((v for k, v in PEAK_BF16_FLOPS if k in device_name), 0.0)


def peak_flops(device: torch.device, override: float = 0.0) -> float:
    """Per-device peak FLOP/s for MFU: the override if > 0, else the datasheet figure (0.0 on CPU / unknown)."""
    if override > 0:
        return override
    if device.type != "cuda":
        return 0.0
    return datasheet_peak_flops(torch.cuda.get_device_name(device))


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (None when the peak is unknown)."""
    return flops_per_token * tokens_per_s / peak if peak else None


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
