"""Train a GPT: one process, or DDP under torchrun, with optional ZeRO-1 and bf16/fp16 autocast.

    python train.py config/shakespeare_cpu.py                          # single process
    python train.py config/shakespeare_cpu.py --max_steps=50 --lr=1e-3   # overrides, --key=value
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_owt.py
    python train.py config/gpt2_owt.py --init_from=resume                # continue out_dir/ckpt.pt exactly
    torchrun --max_restarts=3 ... train.py config/gpt2_owt.py --init_from=auto   # resume if ckpt.pt exists
    python train.py config/gpt2_owt.py --max_steps=0 --max_tokens=0      # write the step-0 weights only

Configs are TrainConfig (config.py). Outputs go to out_dir: ckpt.pt (docs/design.md "Checkpoint"),
metrics.jsonl (one JSON object per logged step) and, when wandb_log=True, a wandb run.

The loop reads nothing back from the device between log steps (every log_interval steps): the loss, the
finite check and the stop request stay on the device until then. A non-finite step never touches the
weights (the fused AdamW kernel skips the update on the device). SIGTERM / SIGINT: the loop finishes its
step and stops at the next log step (up to log_interval steps later), writes a checkpoint and exits 0 (a
second Ctrl-C stops at once). `init_from="resume"` then continues bit-identically on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import secrets
import signal
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import load_checkpoint, save_checkpoint
from common import (
    Dist,
    adamw_kwargs,
    autocast_context,
    configure_backends,
    machine_info,
    param_groups,
    peak_flops,
    rng_state,
    set_rng_state,
    setup_distributed,
    to_device,
)
from data import TokenLoader, load_meta
from errors import run_main
from hf import load_hf_gpt2
from model import GPT, GPTConfig
from train_config import ConfigError, TrainConfig, describe_fields, load_config


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Linear warmup from lr/warmup to lr over warmup_steps, then cosine from lr to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


# ----------------------------------------------------------------------------------------------------
# One optimizer step: what train() runs and bench.py times


@dataclass
class StepResult:
    """Device tensors of one step; nothing here has been read back to the host."""
    loss: torch.Tensor  # mean loss over the step's micro-batches (and ranks)
    grad_norm: torch.Tensor  # global gradient norm before clipping
    finite: torch.Tensor  # bool: loss and gradient norm are finite (else the update was skipped)
    aux_loss: torch.Tensor | None  # MoE load-balancing loss (this rank's mean; already inside loss)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], grad_accum: int,
               autocast: AbstractContextManager, grad_clip: float, skip: torch.Tensor | None = None) -> StepResult:
    """Forward + backward over grad_accum micro-batches (gradients all-reduced once, on the last), clip, and
    one optimizer update; no host-device synchronisation. The update is skipped on the device when the loss
    or gradient norm is not finite, or when `skip` (a bool tensor) is true: the fused AdamW kernel takes a
    `found_inf` flag, as it does from a GradScaler, and then leaves weights, moments and step count alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum = torch.zeros((), device=params[0].device)
    aux_sum = None
    for micro in range(grad_accum):
        x, y = next_batch()
        last = micro == grad_accum - 1
        with (model.no_sync() if isinstance(model, DDP) and not last else nullcontext()), autocast:
            _, loss, aux = model(x, y, return_aux=True)
            loss = loss / grad_accum
        loss_sum += loss.detach()
        if aux is not None:
            aux_sum = aux.detach() / grad_accum + (0 if aux_sum is None else aux_sum)
        scaler.scale(loss).backward()
    if dist.is_initialized():  # the mean over ranks, so every rank takes the same skip decision
        dist.all_reduce(loss_sum)
        loss_sum /= dist.get_world_size()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
    if scaler.is_enabled():
        scaler.step(optimizer)  # fp16: the scaler skips overflowed steps itself
        scaler.update()
    else:
        inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer wraps this rank's AdamW
        bad = ~finite if skip is None else ~finite | skip
        if inner.defaults.get("fused"):
            inner.found_inf = bad.float()
            optimizer.step()
            del inner.found_inf
        elif not bad.item():  # an unfused optimizer cannot skip on the device: one host read
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, grad_norm, finite, aux_sum)


class StepTimer:
    """Wall time of each step without synchronising every step: CUDA events read at log steps on CUDA, the
    host clock on CPU (where every op has finished when it returns)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def start(self) -> None:
        self.marks.append([self._now(), None])

    def stop(self) -> None:
        self.marks[-1][1] = self._now()

    def _now(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def read(self) -> list[float]:
        """Seconds of each step since the last read (synchronises on CUDA)."""
        if self.cuda and self.marks:
            self.marks[-1][1].synchronize()
        out = [(b.elapsed_time(e) / 1e3 if self.cuda else e - b) for b, e in self.marks]
        self.marks = []
        return out


class StopFlag:
    """SIGTERM / SIGINT ask the loop to checkpoint and exit 0 at its next log step; a second SIGINT is a
    hard stop (Python's default handler). Handlers are restored on close()."""

    def __init__(self) -> None:
        self.requested = False
        self.name = ""
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded): no graceful stop
                pass

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True  # no printing here: a handler that prints can interrupt a print (reentrancy)
        self.name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class TrainingDiverged(Exception):
    pass


@torch.no_grad()
def estimate_val_loss(model: torch.nn.Module, cfg: TrainConfig, d: Dist, autocast: AbstractContextManager) -> float:
    """Mean loss over the first eval_iters x micro_batch rows of the val split (file order, the same rows at
    every evaluation). Batch i goes to rank i % world_size, so the number does not depend on the world size."""
    loader = TokenLoader(cfg.data_dir, "val", cfg.micro_batch, cfg.seq_len, seed=cfg.seed, shuffle=False)
    model.eval()
    total = torch.zeros(2, device=d.device)  # (sum of batch losses, number of batches) on this rank
    for i in range(cfg.eval_iters):
        x, y = loader.next_batch()
        if i % d.world_size != d.rank:
            continue
        with autocast:
            _, loss = model(to_device(x, d.device), to_device(y, d.device))
        total += torch.stack([loss.float(), torch.ones((), device=d.device)])
    model.train()
    if d.enabled:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


# ----------------------------------------------------------------------------------------------------
# Setup: the model, the optimizer, the run's log


def build_model(cfg: TrainConfig, ckpt: dict | None, ckpt_path: Path) -> GPT:
    """From the checkpoint being resumed, from scratch, or from a Hugging Face GPT-2."""
    if ckpt is not None:
        mc = GPTConfig.from_dict(ckpt["model_config"])
        saved, wanted = mc.to_dict(), cfg.model_config().to_dict()
        diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
        if diff:
            raise ConfigError(f"init_from=resume: the config's model differs from {ckpt_path}'s "
                              f"(field: (checkpoint, config)) {diff}; use the checkpoint's model settings")
        model = GPT(mc)
        model.load_state_dict(ckpt["model"])
        return model
    if cfg.init_from == "scratch":
        return GPT(cfg.model_config())
    hf = load_hf_gpt2(cfg.init_from)  # fine-tune: dropout from model_overrides still applies
    extra = {k: v for k, v in cfg.model_overrides.items() if k in ("dropout",)}
    model = GPT(GPTConfig(**{**hf.config.to_dict(), **extra}))
    model.load_state_dict(hf.state_dict())
    return model


def build_optimizer(cfg: TrainConfig, d: Dist, model: GPT) -> torch.optim.Optimizer:
    """Fused AdamW (decay on matrices only); ZeRO-1 shards its state across ranks, in flat per-rank buckets
    so the step after it is one broadcast per rank, not one per parameter."""
    kw = adamw_kwargs(cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, d.device.type)
    groups = param_groups(model, cfg.weight_decay)
    if d.enabled and cfg.zero1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, parameters_as_bucket_view=True,
                                       **kw)
    return torch.optim.AdamW(groups, **kw)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a (consolidated) optimizer state. ZeroRedundancyOptimizer.load_state_dict puts every 0-dim state
    tensor (AdamW's step) on the CPU, but the fused CUDA kernel needs it on the parameter's device: move it back."""
    optimizer.load_state_dict(state)
    inner = getattr(optimizer, "optim", optimizer)
    for p, s in inner.state.items():
        if isinstance(s.get("step"), torch.Tensor) and s["step"].device != p.device:
            s["step"] = s["step"].to(p.device)


class RunLog:
    """metrics.jsonl (one JSON object per record, on rank 0) and, if asked, the wandb run."""

    def __init__(self, cfg: TrainConfig, d: Dist, out_dir: Path, step: int, max_steps: int, wandb_id: str | None):
        self.path = out_dir / "metrics.jsonl"
        self.master = d.master
        self.wandb_run = None
        self.wandb_id = wandb_id
        if not d.master:
            return
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create out_dir {out_dir}: {e.strerror}; choose another out_dir") from e
        if step < max_steps:  # (resuming a finished run has nothing to redo: its final val record stays)
            self._truncate(step)  # drop records a killed run wrote after its last checkpoint
        if cfg.wandb_log:
            import wandb

            self.wandb_id = wandb_id or secrets.token_hex(4)  # kept in the checkpoint: a resume continues it
            self.wandb_run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None,
                                        id=self.wandb_id, resume="allow", config=asdict(cfg), dir=str(out_dir))
        if step < max_steps or max_steps == 0:  # what ran and where, for report.py (a finished run's resume: nothing)
            self.record({"step": step, "launch": {"argv": sys.argv, "config": asdict(cfg),
                                                  "machine": machine_info(d.device, d.world_size)}}, to_wandb=False)

    def _truncate(self, step: int) -> None:
        if not self.path.is_file():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.path)

    def record(self, rec: dict, to_wandb: bool = True) -> None:
        if not self.master:
            return
        rec = {**rec, "time": round(time.time(), 3)}  # wall clock (Unix s): report.py's wall time
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:  # disk full, out_dir removed or read-only
            raise ConfigError(f"cannot write {self.path}: {e.strerror}; free disk space or choose another "
                              f"out_dir, then continue with --init_from=resume") from e
        if to_wandb and self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in rec.items() if k not in ("step", "time") and v is not None},
                               step=rec["step"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


# ----------------------------------------------------------------------------------------------------
# Training


def train(cfg: TrainConfig) -> dict:
    """Run the training loop; returns {"losses": [per-step loss], "step", "val_loss", "stopped", ...}."""
    meta = load_meta(cfg.data_dir)  # a missing / incomplete dataset fails here, before any process group work
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} is a file, not a folder; choose another out_dir")
    if cfg.init_from not in ("resume", "auto") and (out / "ckpt.pt").is_file() and not cfg.overwrite:
        # re-running a finished command must not silently replace hours of training at the first save
        raise ConfigError(f"{out / 'ckpt.pt'} already exists: continue it with --init_from=resume (or auto), "
                          "start over with --overwrite=true, or choose another out_dir")
    d = setup_distributed(cfg.device, cfg.backend, cfg.dist_timeout_s)
    try:
        return _train(cfg, d, meta)
    finally:
        if dist.is_initialized() and "RANK" in os.environ:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: Dist, meta: dict) -> dict:
    tokens_per_micro = cfg.micro_batch * cfg.seq_len * d.world_size
    if cfg.total_batch_tokens % tokens_per_micro:
        raise ConfigError(f"total_batch_tokens={cfg.total_batch_tokens} is not divisible by micro_batch * seq_len "
                          f"* world_size = {cfg.micro_batch}*{cfg.seq_len}*{d.world_size} = {tokens_per_micro}")
    grad_accum = cfg.total_batch_tokens // tokens_per_micro
    max_steps = cfg.total_steps
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    log = functools.partial(print, flush=True) if d.master else (lambda *a, **k: None)

    torch.manual_seed(cfg.seed + d.rank)
    configure_backends(tf32=d.device.type == "cuda")  # TF32 matmuls for the fp32 parts on CUDA

    # --- model, optimizer, checkpoint ---------------------------------------------------------------------
    if d.enabled and cfg.init_from in ("auto", "resume"):  # every rank must see the same checkpoint
        seen = torch.tensor([float(ckpt_path.is_file())], device=d.device)
        dist.all_reduce(seen)
        if 0 < seen.item() < d.world_size:
            raise ConfigError(f"{ckpt_path} exists on {int(seen.item())} of {d.world_size} ranks; with several "
                              "nodes out_dir must be on a filesystem they all share")
    if cfg.init_from == "auto":
        cfg = dataclasses.replace(cfg, init_from="resume" if ckpt_path.is_file() else "scratch")
    ckpt = None
    if cfg.init_from == "resume":
        if not ckpt_path.is_file():
            raise ConfigError(f"init_from=resume but {ckpt_path} does not exist; train from scratch first "
                              "or point out_dir at the run to continue")
        ckpt = load_checkpoint(ckpt_path)
    raw_model = build_model(cfg, ckpt, ckpt_path).to(d.device)
    data_vocab = int(meta.get("vocab_size", 50257))
    if raw_model.config.vocab_size < data_vocab:
        raise ConfigError(f"the model's vocab_size={raw_model.config.vocab_size} is smaller than the dataset's "
                          f"({data_vocab}, {cfg.data_dir}/meta.json); set model_overrides vocab_size >= {data_vocab}")
    if cfg.seq_len > raw_model.config.block_size:
        raise ConfigError(f"seq_len={cfg.seq_len} exceeds the model's block_size={raw_model.config.block_size}")
    flops_per_token = raw_model.estimate_flops_per_token(cfg.seq_len)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    eval_model = model  # evaluation skips DDP: ranks run different numbers of eval batches
    if d.enabled:
        model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    optimizer = build_optimizer(cfg, d, raw_model)
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.dtype == "fp16")
    autocast = autocast_context(d.device.type, cfg.dtype)

    loader = TokenLoader(cfg.data_dir, "train", cfg.micro_batch, cfg.seq_len, d.rank, d.world_size, seed=cfg.seed)
    step, tokens_seen, best_val, wandb_id = 0, 0, float("inf"), None
    if ckpt is not None:
        load_optimizer_state(optimizer, ckpt["optimizer"])  # the full (consolidated) state, on every rank
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        loader.load_state_dict(ckpt["loader"])
        step, tokens_seen = ckpt["step"], ckpt["tokens_seen"]
        best_val, wandb_id = ckpt.get("best_val_loss", best_val), ckpt.get("wandb_run_id")
        rngs = ckpt["rng"]
        if len(rngs) == d.world_size:
            set_rng_state(rngs[d.rank], d.device)
        else:
            warnings.warn(f"checkpoint has RNG states for {len(rngs)} ranks, this run has {d.world_size}: "
                          "reseeding (dropout masks will differ from an uninterrupted run)", stacklevel=1)
            torch.manual_seed(cfg.seed + d.rank + 1_000_003 * step)
        log(f"resumed from {ckpt_path} at step {step} ({tokens_seen:,} tokens)")
        del ckpt
    runlog = RunLog(cfg, d, out_dir, step, max_steps, wandb_id)

    def save(step: int) -> None:
        if hasattr(optimizer, "consolidate_state_dict"):
            optimizer.consolidate_state_dict(to=0)  # collective: every rank takes part
        rngs = [rng_state(d.device)]
        if d.enabled:
            rngs = [None] * d.world_size
            dist.all_gather_object(rngs, rng_state(d.device))
        if d.master:
            save_checkpoint({
                "model": raw_model.state_dict(),
                "model_config": raw_model.config.to_dict(),
                "train_config": asdict(cfg),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "step": step,
                "tokens_seen": tokens_seen,
                "loader": loader.state_dict(),
                "rng": rngs,
                "wandb_run_id": runlog.wandb_id,
                "best_val_loss": best_val,
            }, ckpt_path)
            log(f"saved checkpoint {ckpt_path} at step {step}")
        if d.enabled:
            dist.barrier()

    def evaluate(step: int) -> float:
        nonlocal best_val
        val = estimate_val_loss(eval_model, cfg, d, autocast)
        best_val = min(best_val, val)
        rec = {"step": step, "tokens": tokens_seen, "val_loss": val}
        if cfg.hellaswag_interval and step % cfg.hellaswag_interval == 0:
            from eval_hellaswag import evaluate_hellaswag  # lazy: only runs that ask for it need it

            hs = evaluate_hellaswag(raw_model, data_path=cfg.hellaswag_path or None,
                                    limit=cfg.hellaswag_limit or None, device=d.device,
                                    rank=d.rank, world_size=d.world_size)
            rec["hellaswag_acc_norm"] = hs["acc_norm"]
            rec["hellaswag_acc"] = hs.get("acc")
        log(f"step {step}: val loss {val:.4f}"
            + (f" | hellaswag acc_norm {rec['hellaswag_acc_norm']:.4f}" if "hellaswag_acc_norm" in rec else ""))
        runlog.record(rec)
        return val

    log(f"model {raw_model.num_params():,} params | {d.world_size} process(es) on {d.device} | micro_batch "
        f"{cfg.micro_batch} x seq {cfg.seq_len} x grad_accum {grad_accum} x world {d.world_size} = "
        f"{cfg.total_batch_tokens:,} tokens/step | {max_steps} steps | dtype {cfg.dtype}"
        f"{' | ZeRO-1' if d.enabled and cfg.zero1 else ''}")

    # --- loop --------------------------------------------------------------------------------------------
    stop = StopFlag()
    timer = StepTimer(d.device)
    peak = peak_flops(d.device, cfg.peak_flops)
    next_batch = lambda: tuple(to_device(t, d.device) for t in loader.next_batch())  # noqa: E731
    losses: list[float] = []
    pending: list[tuple[int, float, StepResult]] = []  # steps since the last log: (step, lr, device results)
    bad_steps = 0  # consecutive non-finite steps, as known at the last log
    bad_limit = max(1, cfg.max_bad_steps)
    halted = torch.zeros((), dtype=torch.bool, device=d.device)  # set on the device once bad steps run out
    bad_run = torch.zeros((), dtype=torch.int64, device=d.device)
    first_log = True
    val_loss = None
    stopped = False
    try:
        model.train()
        if step == max_steps == 0:  # the step-0 weights only
            if cfg.eval_interval:
                val_loss = evaluate(0)
            save(0)
        while step < max_steps:
            if cfg.eval_interval and step % cfg.eval_interval == 0:
                val_loss = evaluate(step)
            lr = lr_at(step, cfg, max_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            timer.start()
            r = train_step(model, optimizer, scaler, next_batch, grad_accum, autocast, cfg.grad_clip, skip=halted)
            timer.stop()
            if not scaler.is_enabled():  # count consecutive bad steps on the device; halt when they run out
                bad_run = (bad_run + 1) * (~r.finite)
                halted = halted | (bad_run >= bad_limit)
            pending.append((step, lr, r))
            step += 1
            tokens_seen += cfg.total_batch_tokens
            if not ((step - 1) % cfg.log_interval == 0 or step == max_steps):
                continue

            # --- log step: the only place the loop reads the device --------------------------------------
            window, pending = pending, []
            seconds = timer.read()
            values = torch.stack([torch.stack([r.loss.float(), r.grad_norm.float(), r.finite.float()])
                                  for _, _, r in window]).tolist()
            diverged_at = None
            for (s, _, _), (loss_v, norm_v, finite_v) in zip(window, values):
                losses.append(loss_v)
                if scaler.is_enabled() or finite_v:
                    bad_steps = 0
                    continue
                bad_steps += 1
                log(f"warning: step {s}: non-finite loss {loss_v} / grad norm {norm_v}: update skipped "
                    f"({bad_steps} in a row)")
                if bad_steps >= bad_limit and diverged_at is None:
                    diverged_at = s
            last_step, last_lr, last = window[-1]
            step_s = statistics.median(seconds)
            tok_s = cfg.total_batch_tokens / step_s
            mfu = flops_per_token * tok_s / d.world_size / peak if peak else None
            mem = torch.cuda.max_memory_allocated(d.device) / 2**30 if d.device.type == "cuda" else None
            loss_v, norm_v, _ = values[-1]
            rec = {"step": last_step, "tokens": tokens_seen, "loss": loss_v, "lr": last_lr, "grad_norm": norm_v,
                   "tok_per_s": tok_s, "mfu": mfu, "step_ms": step_s * 1000, "peak_mem_gib": mem}
            if first_log:  # the first step of a process pays for warm-up (and compilation): reported apart
                rec["first_step_s"] = seconds[0]
            if last.aux_loss is not None:
                rec["moe_aux_loss"] = last.aux_loss.item()  # this rank's; `loss` includes coef * this
            runlog.record(rec)
            log(f"step {last_step}/{max_steps} | loss {loss_v:.4f} | lr {last_lr:.2e} | norm {norm_v:.3f} | "
                f"{tok_s:,.0f} tok/s | {step_s * 1000:.0f} ms" + (f" | mfu {mfu:.1%}" if mfu is not None else "")
                + (f" | mem {mem:.1f} GiB" if mem is not None else "")
                + (f" | first step {seconds[0]:.1f} s (warm-up{', compile' if cfg.compile else ''})"
                   if first_log else ""))
            first_log = False

            if diverged_at is not None:
                save(step)  # skipped updates left weights and optimizer at the last good step's values
                raise TrainingDiverged(f"stopping: {bad_limit} consecutive steps with a non-finite loss or "
                                       f"gradient at step {diverged_at}; the weights from before step "
                                       f"{diverged_at + 1 - bad_limit} (the last good update) are saved in "
                                       f"{ckpt_path}; lower lr, raise warmup_steps or use bf16/fp32 and continue "
                                       "with --init_from=resume")
            if stop_requested(stop, d):
                save(step)
                log(f"stopped at step {step} by {stop.name or 'a signal on another rank'}; continue with "
                    "--init_from=resume")
                stopped = True
                break
            if step == max_steps and cfg.eval_interval:
                val_loss = evaluate(step)
            if step == max_steps or (cfg.ckpt_interval and step % cfg.ckpt_interval == 0):
                save(step)
    finally:
        stop.close()
        runlog.close()
    return {"losses": losses, "step": step, "val_loss": val_loss, "stopped": stopped,
            "grad_accum": grad_accum, "max_steps": max_steps}


def stop_requested(stop: StopFlag, d: Dist) -> bool:
    """Whether any rank was asked to stop (one all-reduce, at log steps only)."""
    if not d.enabled:
        return stop.requested
    flag = torch.tensor([float(stop.requested)], device=d.device)
    dist.all_reduce(flag)
    return flag.item() > 0


def main() -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        print("TrainConfig fields (--key=value):")
        print(describe_fields())
        return
    cfg = load_config(sys.argv[1:])
    try:
        train(cfg)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
