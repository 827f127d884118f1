"""micro_batch="auto": the largest micro-batch whose full training step fits in the GPU's memory.

The total batch stays total_batch_tokens, so a micro-batch B is a candidate only if it divides the rows each rank
takes per step, R = total_batch_tokens / (seq_len * world_size); grad_accum is then R / B. A probe runs train.py's
own train_step (forward, backward, clip, fused AdamW; torch.compile'd when compile=True) twice on a copy of the
model with a fresh optimizer: the second step holds the AdamW moments and, with grad_accum > 1, gradients during a
forward, as every step of the run does. Whether B fits is monotone in B, so the search probes the largest candidate,
then bisects: at most 1 + ceil(log2(#candidates)) probes. After every probe the copy, its optimizer and every
cached block are freed (gc, torch.cuda.empty_cache) and the compiled graphs are dropped, and the RNG state is put
back, so the run starts as if it had been given the chosen micro_batch.

Under DDP each rank probes its own GPU with no collective (the copy is not DDP-wrapped and its optimizer is not
ZeRO-sharded, so an out-of-memory rank cannot leave the others waiting), then all ranks take the smallest answer.
The probe's unsharded AdamW state (8 bytes/param) covers what it leaves out, DDP's gradient buckets (4 bytes/param)
plus this rank's ZeRO-1 shard, whenever world_size >= 2; without ZeRO-1 it also holds a gradient-sized buffer.

Resuming, the checkpoint's micro_batch is probed first and kept if it still fits (an exact continuation needs the
same micro-batches). On CPU there is no memory to probe: "auto" is the largest candidate <= TrainConfig's default.
The validation loss covers a fixed eval_tokens, so it does not depend on the choice.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common import Dist, autocast_context, rng_state, set_rng_state, sync
from train_config import ConfigError, TrainConfig, defaults

# torch >= 2.5 raises torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same class there)
OutOfMemory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
PROBE_STEPS = 2  # the first step creates the AdamW moments; the second runs with them, as the run does


def micro_batch_candidates(total_batch_tokens: int, seq_len: int, world_size: int) -> list[int]:
    """The micro-batches that keep total_batch_tokens exact: the divisors of the rows per rank and step."""
    rows, rest = divmod(total_batch_tokens, seq_len * world_size)
    if rest or not rows:
        raise ConfigError(f"micro_batch=auto: total_batch_tokens={total_batch_tokens} is not a multiple of seq_len * "
                          f"world_size = {seq_len}*{world_size} = {seq_len * world_size}, so no micro_batch divides "
                          f"it; set total_batch_tokens to a multiple of {seq_len * world_size}")
    small = [b for b in range(1, math.isqrt(rows) + 1) if rows % b == 0]
    return sorted(set(small + [rows // b for b in small]))


@dataclass
class Search:
    micro_batch: int
    tried: list[tuple[int, bool]]  # (micro_batch, fitted) in probe order


def search(fits: Callable[[int], bool], candidates: list[int], prefer: int | None = None) -> Search:
    """The largest candidate that fits (candidates ascending, fitting monotone), trying `prefer` first."""
    tried: list[tuple[int, bool]] = []

    def probe(b: int) -> bool:
        tried.append((b, fits(b)))
        return tried[-1][1]

    lo, hi = -1, len(candidates)  # candidates[lo] fits (lo=-1: none known to); candidates[hi:] do not
    if prefer in candidates:
        if probe(prefer):
            return Search(prefer, tried)
        hi = candidates.index(prefer)
    elif probe(candidates[-1]):
        return Search(candidates[-1], tried)
    else:
        hi = len(candidates) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(candidates[mid]):
            lo = mid
        else:
            hi = mid
    if lo < 0:
        raise ConfigError(f"micro_batch=auto: not even micro_batch={candidates[0]} fits a training step in device "
                          "memory; use a smaller model or seq_len, or a device with more memory")
    return Search(candidates[lo], tried)


def step_fits(model: torch.nn.Module, cfg: TrainConfig, d: Dist, micro_batch: int, grad_accum: int,
              step_fn: Callable, make_optimizer: Callable) -> bool:
    """Whether PROBE_STEPS training steps at micro_batch run on d.device without running out of memory. Runs on a
    copy of `model` (left untouched) and frees everything it made before returning."""
    ok = True
    try:
        probe = copy.deepcopy(model).to(d.device)
        optimizer = make_optimizer(dataclasses.replace(cfg, zero1=False), d, probe)  # local: no collectives
        # held until the probe ends: stands in for DDP's gradient buckets (the probe has no DDP)
        _buckets = (torch.empty(sum(p.numel() for p in probe.parameters()), device=d.device)
                    if d.enabled and not cfg.zero1 else None)
        scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.dtype == "fp16")
        x, y = (torch.randint(probe.config.vocab_size, (micro_batch, cfg.seq_len), device=d.device) for _ in "xy")
        stepped = torch.compile(probe) if cfg.compile else probe
        for _ in range(PROBE_STEPS):
            step_fn(stepped, optimizer, scaler, lambda: (x, y), min(grad_accum, 2),
                    autocast_context(d.device.type, cfg.dtype), cfg.grad_clip)
        sync(d.device)
    except OutOfMemory:  # (anything else is a real error and propagates)
        ok = False
    return ok  # the probe's tensors go with this frame; the caller collects cycles and empties the cache


def _free(compiled: bool) -> None:
    gc.collect()  # tensors in reference cycles (an exception's frames) go first, then their cached blocks
    if compiled:
        torch._dynamo.reset()  # each probe compiles its own static-shape graph, as the run will
    torch.cuda.empty_cache()  # a no-op unless CUDA is in use


def min_over_ranks(value: int, d: Dist) -> int:
    """The smallest value over all ranks (every rank must call this)."""
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def search_micro_batch(model: torch.nn.Module, cfg: TrainConfig, d: Dist, step_fn: Callable,
                       make_optimizer: Callable, prefer: int | None = None) -> Search:
    """Probe this rank's device for the largest candidate micro-batch (no collectives; see min_over_ranks)."""
    candidates = micro_batch_candidates(cfg.total_batch_tokens, cfg.seq_len, d.world_size)
    rows = candidates[-1]
    rng = rng_state(d.device)

    def fits(b: int) -> bool:
        ok = step_fits(model, cfg, d, b, rows // b, step_fn, make_optimizer)
        _free(cfg.compile)
        return ok

    try:
        return search(fits, candidates, prefer)
    finally:
        set_rng_state(rng, d.device)
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)  # the run's logged peak memory is its own


def choose_micro_batch(cfg: TrainConfig, d: Dist, model: torch.nn.Module, step_fn: Callable,
                       make_optimizer: Callable, log: Callable[[str], None], prefer: object = None) -> TrainConfig:
    """cfg with micro_batch="auto" replaced by a number (the same on every rank), and one log line saying why.
    model: the run's model, not yet on the device; step_fn, make_optimizer: train.train_step, train.build_optimizer;
    prefer: the micro_batch of the checkpoint being resumed, if any."""
    candidates = micro_batch_candidates(cfg.total_batch_tokens, cfg.seq_len, d.world_size)
    prefer = prefer if isinstance(prefer, int) and prefer in candidates else None
    if d.device.type != "cuda":
        default = defaults()["micro_batch"]
        mb = prefer or max(b for b in candidates if b <= default)
        why = f"on {d.device.type} there is no device memory to probe: " + (
            "the checkpoint's" if prefer else
            f"the largest divisor of the {candidates[-1]} rows per rank and step that is <= the default {default}")
    else:
        t0 = time.perf_counter()
        found = search_micro_batch(model, cfg, d, step_fn, make_optimizer, prefer)
        mb = min_over_ranks(found.micro_batch, d)
        gib = torch.cuda.get_device_properties(d.device).total_memory / 2**30
        tried = ", ".join(f"{b} {'fits' if ok else 'out of memory'}" for b, ok in found.tried)
        which = "the checkpoint's, which still fits" if mb == prefer else "the largest that fits"
        why = (f"{which}: {cfg.dtype}{' compiled' if cfg.compile else ''} training steps in {gib:.0f} GiB at seq_len "
               f"{cfg.seq_len}, probed {tried} in {time.perf_counter() - t0:.0f} s"
               + (f"; the smallest over {d.world_size} ranks" if d.enabled else ""))
    log(f"micro_batch auto: {mb} x grad_accum {candidates[-1] // mb} ({why})")
    return dataclasses.replace(cfg, micro_batch=mb)
