"""Train a GPT: one process, or DDP under torchrun, with optional ZeRO-1 and bf16/fp16 autocast.

    python train.py config/shakespeare_cpu.py                          # single process
    python train.py config/shakespeare_cpu.py --max_steps=50 --lr=1e-3   # overrides, --key=value
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_owt.py
    python train.py config/gpt2_owt.py --init_from=resume                # continue the newest checkpoint exactly
    torchrun --max_restarts=3 ... train.py config/gpt2_owt.py --init_from=auto   # resume if there is one
    python train.py config/gpt2_owt.py --max_steps=0 --max_tokens=0      # write the step-0 weights only

Configs are TrainConfig (train_config.py). Outputs go to out_dir: ckpt.pt, the newest checkpoint, with the
last keep_checkpoints as ckpt_<step>.pt (docs/design.md "Checkpoint"; a corrupt newest one falls back to the
one before), metrics.jsonl (one JSON object per record) and, when wandb_log=True, a wandb run.

The loop reads nothing back from the device between log steps (every log_interval steps): the loss, the
finite check and the stop request stay on the device until then. A non-finite step never touches the
weights (the fused AdamW kernel skips the update on the device). SIGTERM / SIGINT: the loop finishes its
step and stops at the next log step (up to log_interval steps later), writes a checkpoint and exits 0 (a
second Ctrl-C stops at once). `init_from="resume"` then continues bit-identically on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
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

from autobatch import choose_micro_batch
from checkpoint import RunCheckpoints
from common import (
    Dist,
    autocast_context,
    configure_backends,
    peak_flops,
    rng_state,
    set_rng_state,
    setup_distributed,
    to_device,
)
from data import TokenLoader, load_meta, split_tokens
from errors import print_error, run_main
from hf import load_hf_gpt2
from model import GPT, GPTConfig
from monitor import RunLog, StepTimer, StopFlag, step_line, step_record
from optim import build_optimizer, load_optimizer_state
from run_lock import run_lock
from seed_rows import train_loader
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
    if isinstance(model, DDP):  # the mean over ranks, so every rank takes the same skip decision (only DDP
        # ranks share gradients: autobatch.py's probes run undistributed models and must not wait on each other)
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


class TrainingDiverged(Exception):
    pass


@torch.no_grad()
def estimate_val_loss(model: torch.nn.Module, cfg: TrainConfig, d: Dist, autocast: AbstractContextManager) -> float:
    """Mean token loss over the val split's first eval_tokens // seq_len rows (file order): the same tokens at
    every evaluation, for any micro_batch and world size. Batch i goes to rank i % world_size."""
    loader = TokenLoader(cfg.data_dir, "val", cfg.micro_batch, cfg.seq_len, seed=cfg.seed, shuffle=False)
    rows = min(cfg.eval_tokens // cfg.seq_len, loader.n_rows)
    model.eval()
    total = torch.zeros(2, device=d.device)  # (sum of token losses, tokens) on this rank
    for i, start in enumerate(range(0, rows, cfg.micro_batch)):
        x, y = loader.next_batch()
        if i % d.world_size != d.rank:
            continue
        n = min(cfg.micro_batch, rows - start)  # the last batch may be partial
        with autocast:
            _, loss = model(to_device(x[:n], d.device), to_device(y[:n], d.device))
        total += torch.stack([loss.float() * y[:n].numel(), torch.tensor(float(y[:n].numel()), device=d.device)])
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


# ----------------------------------------------------------------------------------------------------
# Training


def train(cfg: TrainConfig) -> dict:
    """Run the training loop; returns {"losses": [per-step loss], "step", "val_loss", "stopped", ...}."""
    meta = load_meta(cfg.data_dir)  # a missing / incomplete dataset fails here, before any process group work
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} is a file, not a folder; choose another out_dir")
    ckpts = RunCheckpoints(out, cfg.keep_checkpoints, cfg.keep_best)
    if cfg.init_from not in ("resume", "auto") and ckpts.newest_first() and not cfg.overwrite:
        # re-running a finished command must not silently replace hours of training at the first save
        raise ConfigError(f"{ckpts.latest} already exists: continue it with --init_from=resume (or auto), "
                          "start over with --overwrite=true, or choose another out_dir")
    d = setup_distributed(cfg.device, cfg.backend, cfg.dist_timeout_s)
    try:
        with run_lock(cfg.out_dir) if d.master else nullcontext():  # one live run per out_dir
            return _train(cfg, d, meta, ckpts)
    finally:
        if dist.is_initialized() and "RANK" in os.environ:
            dist.destroy_process_group()


def check_ranks_agree(cfg: TrainConfig, d: Dist, ckpts: RunCheckpoints) -> None:
    """Every rank must read the same data and see the same checkpoints: with separately prepared copies on
    two nodes, rows would silently overlap or be skipped."""
    if not d.enabled:
        return
    mine = (hashlib.sha256((Path(cfg.data_dir) / "meta.json").read_bytes()).hexdigest(),
            [p.name for p in ckpts.newest_first()])
    everyone = [None] * d.world_size
    dist.all_gather_object(everyone, mine)
    problem = None
    for rank, (meta_hash, names) in enumerate(everyone):
        if meta_hash != everyone[0][0]:
            problem = (f"rank {rank} reads other data than rank 0 ({cfg.data_dir}/meta.json differs); "
                       "prepare the dataset once and give every node the same copy")
        elif names != everyone[0][1]:
            problem = (f"rank {rank} sees other checkpoints in {cfg.out_dir} than rank 0 ({names} vs "
                       f"{everyone[0][1]}); with several nodes out_dir must be on a filesystem they all share")
        if problem:
            break
    if problem is None:
        return
    # Every rank knows the problem. Rank 0 alone reports it, and nobody exits before its line is out: torchrun
    # stops the other workers as soon as one exits, which could cut off a line printed on the way out.
    if d.master:
        print_error(problem)
    dist.barrier()
    sys.exit(2)


def _train(cfg: TrainConfig, d: Dist, meta: dict, ckpts: RunCheckpoints) -> dict:
    max_steps = cfg.total_steps
    log = functools.partial(print, flush=True) if d.master else (lambda *a, **k: None)

    torch.manual_seed(cfg.seed + d.rank)
    configure_backends(tf32=d.device.type == "cuda")  # TF32 matmuls for the fp32 parts on CUDA

    # --- model, optimizer, checkpoint ---------------------------------------------------------------------
    check_ranks_agree(cfg, d, ckpts)
    ckpt, ckpt_path = None, ckpts.latest
    if cfg.init_from in ("resume", "auto"):
        found = ckpts.load_newest(log)  # the newest that loads; a corrupt one falls back to the one before
        if found is None and cfg.init_from == "resume":
            raise ConfigError(f"init_from=resume but {ckpt_path} does not exist; train from scratch first "
                              "or point out_dir at the run to continue")
        ckpt, ckpt_path = found or (None, ckpt_path)
        cfg = dataclasses.replace(cfg, init_from="resume" if ckpt else "scratch")
    raw_model = build_model(cfg, ckpt, ckpt_path)
    data_vocab = int(meta.get("vocab_size", 50257))
    if raw_model.config.vocab_size < data_vocab:
        raise ConfigError(f"the model's vocab_size={raw_model.config.vocab_size} is smaller than the dataset's "
                          f"({data_vocab}, {cfg.data_dir}/meta.json); set model_overrides vocab_size >= {data_vocab}")
    if cfg.seq_len > raw_model.config.block_size:
        raise ConfigError(f"seq_len={cfg.seq_len} exceeds the model's block_size={raw_model.config.block_size}")
    if cfg.micro_batch == "auto":  # probed on copies of the model before it takes device memory
        cfg = choose_micro_batch(cfg, d, raw_model, train_step, build_optimizer, log,
                                 prefer=ckpt and ckpt.get("train_config", {}).get("micro_batch"))
    tokens_per_micro = cfg.micro_batch * cfg.seq_len * d.world_size
    if cfg.total_batch_tokens % tokens_per_micro:
        raise ConfigError(f"total_batch_tokens={cfg.total_batch_tokens} is not divisible by micro_batch * seq_len "
                          f"* world_size = {cfg.micro_batch}*{cfg.seq_len}*{d.world_size} = {tokens_per_micro}")
    grad_accum = cfg.total_batch_tokens // tokens_per_micro
    raw_model = raw_model.to(d.device)
    flops_per_token = raw_model.estimate_flops_per_token(cfg.seq_len)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    eval_model = model  # evaluation skips DDP: ranks run different numbers of eval batches
    if d.enabled:
        model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    optimizer = build_optimizer(cfg, d, raw_model)
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.dtype == "fp16")
    autocast = autocast_context(d.device.type, cfg.dtype)

    loader = train_loader(cfg, d.rank, d.world_size)  # rows: packed (TokenLoader) or seed_rows.py's formats
    step, tokens_seen, best_val, best_step, wandb_id = 0, 0, float("inf"), -1, None
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
    runlog = RunLog(cfg, d, ckpts.dir, step, max_steps, wandb_id)

    def save(step: int) -> None:
        t0 = time.perf_counter()
        if hasattr(optimizer, "consolidate_state_dict"):
            optimizer.consolidate_state_dict(to=0)  # collective: every rank takes part
        rngs = [rng_state(d.device)]
        if d.enabled:
            rngs = [None] * d.world_size
            dist.all_gather_object(rngs, rng_state(d.device))
        if d.master:
            ckpts.save({
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
            }, step)
            if best_step == step:
                ckpts.mark_best(step)
        if d.enabled:
            dist.barrier()
        # the time a preemption's grace period must cover (docs/reliability.md "Preemption")
        log(f"saved checkpoint {ckpts.latest} at step {step} in {time.perf_counter() - t0:.1f} s")

    val_bytes = meta.get("text_bytes", {}).get("val")  # bits per byte compare across tokenizers
    bytes_per_token = val_bytes / split_tokens(cfg.data_dir, "val") if val_bytes else None

    def evaluate(step: int) -> float:
        nonlocal best_val, best_step
        val = estimate_val_loss(eval_model, cfg, d, autocast)
        if val < best_val:
            best_val, best_step = val, step
            if d.master:
                ckpts.mark_best(step)  # this step's checkpoint, if it was saved before the evaluation
        bpb = val / math.log(2) / bytes_per_token if bytes_per_token else None
        log(f"step {step}: val loss {val:.4f}" + (f" | {bpb:.4f} bits/byte" if bpb else ""))
        runlog.record({"step": step, "tokens": tokens_seen, "val_loss": val, "val_bpb": bpb})
        return val

    def hellaswag(step: int) -> None:
        from eval_hellaswag import evaluate_hellaswag  # lazy: only runs that ask for it need it

        with autocast:  # the run's precision; log-softmax is fp32 inside
            hs = evaluate_hellaswag(raw_model, data_path=cfg.hellaswag_path or None, limit=cfg.hellaswag_limit or None,
                                    max_length=min(512, raw_model.config.block_size), device=d.device,
                                    rank=d.rank, world_size=d.world_size)
        log(f"step {step}: hellaswag acc_norm {hs['acc_norm']:.4f}")
        runlog.record({"step": step, "tokens": tokens_seen, "hellaswag_acc_norm": hs["acc_norm"],
                       "hellaswag_acc": hs["acc"]})

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
            if cfg.hellaswag_interval and step and step % cfg.hellaswag_interval == 0:
                hellaswag(step)
            lr = lr_at(step, cfg, max_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)  # Muon / AdamW groups: each its own base lr (build_optimizer)
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
            rec = step_record(last_step, tokens_seen, last_lr, values[-1], seconds, cfg.total_batch_tokens,
                              flops_per_token, peak, d)
            # targets the loss saw, over all ranks: seed rows leave out their padding; packed rows have none
            rec["loss_tokens"] = loader.loss_tokens if cfg.rows == "seed512" else tokens_seen
            if first_log:  # the first step of a process pays for warm-up (and compilation): reported apart
                rec["first_step_s"], first_log = seconds[0], False
            if last.aux_loss is not None:
                rec["moe_aux_loss"] = last.aux_loss.item()  # this rank's; `loss` includes coef * this
            runlog.record(rec)
            log(step_line(rec, max_steps))

            if diverged_at is not None:
                save(step)  # skipped updates left weights and optimizer at the last good step's values
                raise TrainingDiverged(f"stopping: {bad_limit} consecutive steps with a non-finite loss or "
                                       f"gradient at step {diverged_at}; the weights from before step "
                                       f"{diverged_at + 1 - bad_limit} (the last good update) are saved in "
                                       f"{ckpts.latest}; lower lr, raise warmup_steps or use bf16/fp32 and "
                                       "continue with --init_from=resume")
            if stop.on_any_rank(d):
                save(step)
                log(f"stopped at step {step} by {stop.name or 'a signal on another rank'}; continue with "
                    "--init_from=resume")
                stopped = True
                break
            if step == max_steps and cfg.eval_interval:
                val_loss = evaluate(step)
            if step == max_steps and cfg.hellaswag_interval:
                hellaswag(step)  # the final model is always scored
            if step == max_steps or (cfg.ckpt_interval and step % cfg.ckpt_interval == 0):
                save(step)
    finally:
        stop.close()
        runlog.close()
    return {"losses": losses, "step": step, "val_loss": val_loss, "stopped": stopped,
            "grad_accum": grad_accum, "max_steps": max_steps}


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
        print_error(str(e))
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
