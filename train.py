"""Train a GPT: one process, or DDP under torchrun, with optional ZeRO-1 and bf16/fp16 autocast.

    python train.py config/shakespeare_cpu.py                          # single process
    python train.py config/shakespeare_cpu.py --max_steps=50 --lr=1e-3   # overrides, --key=value
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_owt.py
    python train.py config/gpt2_owt.py --init_from=resume                # continue the newest checkpoint exactly
    torchrun --max_restarts=3 ... train.py config/gpt2_owt.py --init_from=auto   # resume if there is one
    python train.py config/gpt2_owt.py --max_steps=0 --max_tokens=0      # write the step-0 weights only

Configs are TrainConfig (train_config.py). Outputs go to out_dir: ckpt.pt, the newest checkpoint, with the
last keep_checkpoints as ckpt_<step>.pt (docs/design.md "Checkpoint"; a corrupt newest one falls back to the
one before), metrics.jsonl (one JSON object per step, evaluation and launch) and, when wandb_log=True, a wandb
run.

What happens after each step is schedule.py's: checkpoints every ckpt_interval steps, evaluations every
eval_interval / hellaswag_interval steps, a log line every log_interval steps; at the end the checkpoint, then
the final evaluations. The loop reads nothing back from the device between syncs (the steps where any of these
is due): the loss, the finite check and the stop request stay on the device until then. A non-finite step never
touches the weights (the fused AdamW kernel skips the update on the device). SIGTERM / SIGINT: the loop finishes
its step, runs on to the next sync (at most log_interval steps, or the end of the evaluation in progress), skips
the evaluations still due, writes a checkpoint and exits 0 (a second Ctrl-C stops at once); `init_from="resume"`
then continues bit-identically on CPU, first running the evaluations the stop skipped (docs/reliability.md).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
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
from errors import UserError, print_error, run_main
from hf import load_hf_gpt2
from model import GPT, GPTConfig
from monitor import RunLog, StepTimer, StopFlag, speed, step_line, step_record
from optim import build_optimizer, load_optimizer_state
from run_lock import run_lock
from schedule import CHECKPOINT, EVALUATE, EVALUATIONS, LOG, SYNC, Schedule
from seed_rows import train_loader
from train_config import ConfigError, TrainConfig, describe_fields, load_config


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Linear warmup from lr/warmup to lr over warmup_steps, then cosine from lr to min_lr at max_steps; or, with
    warmdown_frac > 0, lr until the last warmdown_frac of the steps, then linear to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= max_steps:
        return cfg.min_lr
    if cfg.warmdown_frac > 0:
        decay_start = max(cfg.warmup_steps, max_steps - round(cfg.warmdown_frac * max_steps))
        progress = max(0, step - decay_start) / max(1, max_steps - decay_start)
        return cfg.lr + progress * (cfg.min_lr - cfg.lr)
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
    """Mean token loss over the val split's first eval_tokens // seq_len rows, read by index in file order: the
    same tokens at every evaluation, for any micro_batch and world size. Batch i goes to rank i % world_size.
    Every batch has micro_batch rows (a short last one is filled up with copies of a row whose targets are
    ignored), so a compiled model sees one shape."""
    loader = TokenLoader(cfg.data_dir, "val", cfg.micro_batch, cfg.seq_len, shuffle=False)
    rows = min(cfg.eval_tokens // cfg.seq_len, loader.n_rows)
    model.eval()
    total = torch.zeros(2, device=d.device)  # (sum of token losses, tokens) on this rank
    for i, start in enumerate(range(0, rows, cfg.micro_batch)):
        if i % d.world_size != d.rank:
            continue
        index = np.arange(start, start + cfg.micro_batch)
        filler = index >= rows
        x, y = loader.rows_at(np.where(filler, start, index))
        y = y.clone()  # (a view that shares x's buffer)
        y[torch.from_numpy(filler)] = -1
        with autocast:
            _, loss = model(to_device(x, d.device), to_device(y, d.device))
        n = float((y != -1).sum())
        total += torch.stack([loss.float() * n, torch.tensor(n, device=d.device)])
    model.train()
    if d.enabled:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


# ----------------------------------------------------------------------------------------------------
# Setup: the model, the checks every rank must pass before the first step


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


def exit_together(d: Dist, problem: str | None) -> None:
    """Exit 2 on every rank if any rank has a problem, with one line: the first such rank's, printed by rank 0.
    Nobody exits before that line is out: torchrun stops the other workers as soon as one exits, which could
    cut off a line printed on the way out."""
    if not d.enabled:
        if problem:
            raise ConfigError(problem)
        return
    everyone: list[str | None] = [None] * d.world_size
    dist.all_gather_object(everyone, problem)
    first = next(((rank, p) for rank, p in enumerate(everyone) if p), None)
    if first is None:
        return
    if d.master:
        print_error(first[1] if first[0] == 0 else f"rank {first[0]}: {first[1]}")
    dist.barrier()
    sys.exit(2)


def check_ranks_agree(cfg: TrainConfig, d: Dist, ckpts: RunCheckpoints) -> None:
    """Every rank must read the same data and see the same checkpoints: with separately prepared copies on
    two nodes, rows would silently overlap or be skipped."""
    if not d.enabled:
        return
    dist.barrier()  # rank 0 may have just cleared out_dir (overwrite=true): list it after that
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
    exit_together(d, problem)


def check_hellaswag_data(cfg: TrainConfig, d: Dist) -> None:
    """A run that scores HellaSwag loads and checks its data on every rank before the first step: an offline
    node or a wrong path fails now, not hours in (and not in a loop of elastic restarts)."""
    problem = None
    if cfg.hellaswag_interval:
        from eval_hellaswag import load_hellaswag  # lazy: only runs that ask for it need it

        try:
            load_hellaswag(cfg.hellaswag_path or None, cfg.hellaswag_limit or None)  # cached for the evaluations
        except UserError as e:
            problem = f"hellaswag_interval={cfg.hellaswag_interval}: {e}"
    exit_together(d, problem)


def diverged_refusal(ckpt: dict, path: Path, cfg: TrainConfig) -> str | None:
    """Why a checkpoint saved when training diverged must not be continued unchanged, or None."""
    div = ckpt.get("diverged")
    if not div or cfg.resume_diverged_at == div["step"]:
        return None
    return (f"{path} was saved when training diverged ({div['bad_steps']} non-finite steps in a row up to step "
            f"{div['step']}; it holds {weights_after(div['last_good_step'])}, the last good update): "
            f"init_from={cfg.init_from} does not continue it unchanged. Lower lr, raise warmup_steps or use "
            f"bf16/fp32, then continue it on purpose with --resume_diverged_at={div['step']} (the data of the "
            "bad steps is skipped)")


def weights_after(last_good_step: int) -> str:
    return f"the weights after step {last_good_step}" if last_good_step >= 0 else "the initial weights"


# ----------------------------------------------------------------------------------------------------
# Training


def train(cfg: TrainConfig) -> dict:
    """Run the training loop; returns {"losses": [per-step loss], "step", "val_loss", "stopped", ...}."""
    meta = load_meta(cfg.data_dir)  # a missing / incomplete dataset fails here, before any process group work
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} is a file, not a folder; choose another out_dir")
    ckpts = RunCheckpoints(out, cfg.keep_checkpoints, cfg.keep_best)
    fresh = cfg.init_from not in ("resume", "auto")
    if fresh and ckpts.newest_first() and not cfg.overwrite:
        # re-running a finished command must not silently replace hours of training at the first save
        raise ConfigError(f"{ckpts.latest} already exists: continue it with --init_from=resume (or auto), "
                          "start over with --overwrite=true, or choose another out_dir")
    d = setup_distributed(cfg.device, cfg.backend, cfg.dist_timeout_s)
    try:
        with run_lock(cfg.out_dir) if d.master else nullcontext():  # one live run per out_dir
            if fresh and cfg.overwrite and d.master:
                clear_previous_run(ckpts)
            return Trainer(cfg, d, meta, ckpts).run()
    finally:
        if dist.is_initialized() and "RANK" in os.environ:
            dist.destroy_process_group()


def clear_previous_run(ckpts: RunCheckpoints) -> None:
    """overwrite=true: the old run goes before anything else happens, so that a crash before the new run's first
    checkpoint cannot leave the old weights for an init_from=auto restart to continue under the new config."""
    removed = ckpts.remove_all()
    metrics = ckpts.dir / "metrics.jsonl"
    had_metrics = metrics.is_file()
    metrics.unlink(missing_ok=True)
    if removed or had_metrics:
        print(f"overwrite=true: removed the previous run's {removed} checkpoint file(s)"
              f"{' and metrics.jsonl' if had_metrics else ''} from {ckpts.dir}", flush=True)


class Trainer:
    """One run: set up (and resumed) by the constructor, then run() trains and, after each step, does what
    schedule.py says is due. The loop reads the device only at syncs (schedule.SYNC)."""

    def __init__(self, cfg: TrainConfig, d: Dist, meta: dict, ckpts: RunCheckpoints):
        self.d, self.ckpts = d, ckpts
        self.log = functools.partial(print, flush=True) if d.master else (lambda *a, **k: None)
        torch.manual_seed(cfg.seed + d.rank)
        configure_backends(tf32=d.device.type == "cuda")  # TF32 matmuls for the fp32 parts on CUDA
        check_ranks_agree(cfg, d, ckpts)
        check_hellaswag_data(cfg, d)
        ckpt, ckpt_path, cfg = self._checkpoint_to_resume(cfg)
        self.cfg = cfg = self._build(cfg, meta, ckpt, ckpt_path)
        self.max_steps, self.schedule = cfg.total_steps, Schedule.of(cfg)
        self.step, self.tokens_seen, self.best_val, self.best_step = 0, 0, float("inf"), -1
        self.last_good_step, self.bad_steps, wandb_id = -1, 0, None  # (last good: the last update applied)
        if ckpt is not None:
            wandb_id = self._resume(ckpt, ckpt_path)
        self.resumed = ckpt is not None
        self.runlog = RunLog(cfg, d, ckpts.dir, self.step, self.max_steps, wandb_id, resumed=self.resumed)
        val_bytes = meta.get("text_bytes", {}).get("val")  # bits per byte compare across tokenizers
        self.bytes_per_token = val_bytes / split_tokens(cfg.data_dir, "val") if val_bytes else None
        self.val_loss = self._recorded_val_loss()
        self.stop = StopFlag()
        self.timer = StepTimer(d.device)
        self.peak = peak_flops(d.device, cfg.peak_flops)
        self.pending: list[tuple] = []  # steps since the last sync: (step, lr, StepResult, tokens, loss_tokens)
        self.since_log: list[float] = []  # step seconds since the last log line (its speed is their median)
        self.losses: list[float] = []
        self.first_record = True  # the first step of a process pays for warm-up (and compilation)
        self.bad_limit = max(1, cfg.max_bad_steps)
        # consecutive non-finite steps, counted on the device; once they reach the limit, every update is skipped
        self.bad_run = torch.tensor(self.bad_steps, dtype=torch.int64, device=d.device)
        self.halted = self.bad_run >= self.bad_limit
        self.log(f"model {self.raw_model.num_params():,} params | {d.world_size} process(es) on {d.device} | "
                 f"micro_batch {cfg.micro_batch} x seq {cfg.seq_len} x grad_accum {self.grad_accum} x world "
                 f"{d.world_size} = {cfg.total_batch_tokens:,} tokens/step | {self.max_steps} steps | dtype "
                 f"{cfg.dtype}{' | ZeRO-1' if d.enabled and cfg.zero1 else ''}")

    def _checkpoint_to_resume(self, cfg: TrainConfig) -> tuple[dict | None, Path, TrainConfig]:
        ckpt, ckpt_path = None, self.ckpts.latest
        if cfg.init_from in ("resume", "auto"):
            found = self.ckpts.load_newest(self.log)  # the newest that loads; a corrupt one falls back
            if found is None and cfg.init_from == "resume":
                raise ConfigError(f"init_from=resume but {ckpt_path} does not exist; train from scratch first "
                                  "or point out_dir at the run to continue")
            ckpt, ckpt_path = found or (None, ckpt_path)
            exit_together(self.d, ckpt and diverged_refusal(ckpt, ckpt_path, cfg))
            cfg = dataclasses.replace(cfg, init_from="resume" if ckpt else "scratch")
        return ckpt, ckpt_path, cfg

    def _build(self, cfg: TrainConfig, meta: dict, ckpt: dict | None, ckpt_path: Path) -> TrainConfig:
        """The model (compiled, DDP-wrapped), optimizer, scaler, autocast and train loader; returns the config
        with micro_batch settled."""
        d = self.d
        raw_model = build_model(cfg, ckpt, ckpt_path)
        data_vocab = int(meta.get("vocab_size", 50257))
        if raw_model.config.vocab_size < data_vocab:
            raise ConfigError(f"the model's vocab_size={raw_model.config.vocab_size} is smaller than the dataset's "
                              f"({data_vocab}, {cfg.data_dir}/meta.json); set model_overrides vocab_size >= "
                              f"{data_vocab}")
        if cfg.seq_len > raw_model.config.block_size:
            raise ConfigError(f"seq_len={cfg.seq_len} exceeds the model's block_size={raw_model.config.block_size}")
        if cfg.micro_batch == "auto":  # probed on copies of the model before it takes device memory
            cfg = choose_micro_batch(cfg, d, raw_model, train_step, build_optimizer, self.log,
                                     prefer=ckpt and ckpt.get("train_config", {}).get("micro_batch"))
        tokens_per_micro = cfg.micro_batch * cfg.seq_len * d.world_size
        if cfg.total_batch_tokens % tokens_per_micro:
            raise ConfigError(f"total_batch_tokens={cfg.total_batch_tokens} is not divisible by micro_batch * "
                              f"seq_len * world_size = {cfg.micro_batch}*{cfg.seq_len}*{d.world_size} = "
                              f"{tokens_per_micro}")
        self.grad_accum = cfg.total_batch_tokens // tokens_per_micro
        self.raw_model = raw_model = raw_model.to(d.device)
        self.flops_per_token = raw_model.estimate_flops_per_token(cfg.seq_len)
        model = torch.compile(raw_model) if cfg.compile else raw_model
        self.eval_model = model  # evaluation skips DDP: ranks run different numbers of eval batches
        if d.enabled:
            model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
        self.model = model
        self.optimizer = build_optimizer(cfg, d, raw_model)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.dtype == "fp16")
        self.autocast = autocast_context(d.device.type, cfg.dtype)
        self.loader = train_loader(cfg, d.rank, d.world_size)  # packed (TokenLoader) or seed_rows.py's formats
        return cfg

    def _resume(self, ckpt: dict, path: Path) -> str | None:
        """Optimizer, scaler, data position, counters and RNG from the checkpoint; returns its wandb run id."""
        load_optimizer_state(self.optimizer, ckpt["optimizer"])  # the full (consolidated) state, on every rank
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.loader.load_state_dict(ckpt["loader"])
        self.step, self.tokens_seen = ckpt["step"], ckpt["tokens_seen"]
        self.best_val = ckpt.get("best_val_loss", self.best_val)
        self.last_good_step = ckpt.get("last_good_step", self.step - 1)
        if not ckpt.get("diverged"):  # (continued on purpose: the count of bad steps starts again)
            self.bad_steps = ckpt.get("bad_steps", 0)
        rngs = ckpt["rng"]
        if len(rngs) == self.d.world_size:
            set_rng_state(rngs[self.d.rank], self.d.device)
        else:
            warnings.warn(f"checkpoint has RNG states for {len(rngs)} ranks, this run has {self.d.world_size}: "
                          "reseeding (dropout masks will differ from an uninterrupted run)", stacklevel=1)
            torch.manual_seed(self.cfg.seed + self.d.rank + 1_000_003 * self.step)
        self.log(f"resumed from {path} at step {self.step} ({self.tokens_seen:,} tokens)")
        return ckpt.get("wandb_run_id")

    def _recorded_val_loss(self) -> float | None:
        """A resumed run whose step's val loss is already recorded: that value (it counts for the best)."""
        rec = self.runlog.evaluated.get("evaluate")
        if rec is None:
            return None
        if rec["val_loss"] < self.best_val:
            self.best_val, self.best_step = rec["val_loss"], self.step
        return rec["val_loss"]

    # --- the loop --------------------------------------------------------------------------------------

    def run(self) -> dict:
        stopped = False
        try:
            self.model.train()
            stopped = self._after(self.step, owed_only=self.resumed)
            while not stopped and self.step < self.max_steps:
                self._train_one_step()
                stopped = self._after(self.step)
        finally:
            self.stop.close()
            self.runlog.close()
        return {"losses": self.losses, "step": self.step, "val_loss": self.val_loss, "stopped": stopped,
                "grad_accum": self.grad_accum, "max_steps": self.max_steps}

    def _train_one_step(self) -> None:
        cfg = self.cfg
        lr = lr_at(self.step, cfg, self.max_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)  # Muon / AdamW groups: each its own base lr (build_optimizer)
        self.timer.start()
        r = train_step(self.model, self.optimizer, self.scaler, self.next_batch, self.grad_accum, self.autocast,
                       cfg.grad_clip, skip=self.halted)
        self.timer.stop()
        if not self.scaler.is_enabled():  # count consecutive bad steps on the device; halt when they run out
            self.bad_run = (self.bad_run + 1) * (~r.finite)
            self.halted = self.halted | (self.bad_run >= self.bad_limit)
        self.tokens_seen += cfg.total_batch_tokens
        # targets the loss saw, over all ranks: seed rows leave out their padding; packed rows have none
        loss_tokens = self.loader.loss_tokens if cfg.rows == "seed512" else self.tokens_seen
        self.pending.append((self.step, lr, r, self.tokens_seen, loss_tokens))
        self.step += 1

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.loader.next_batch()
        return to_device(x, self.d.device), to_device(y, self.d.device)

    def _after(self, step: int, owed_only: bool = False) -> bool:
        """Do what is due once `step` steps are done (owed_only: a resumed run's start, which owes only the
        evaluations of its step that the record lacks). A stop request, agreed across ranks at the sync and
        after each evaluation, skips the rest: save and return True."""
        actions = self.schedule.actions_after(step)
        if owed_only:
            actions = tuple(a for a in self.schedule.evaluations_after(step) if a not in self.runlog.evaluated)
            if step == self.max_steps:
                self.log(f"the run ended at step {step}: " + (f"running its final {', '.join(actions)}" if actions
                                                             else "its checkpoint and evaluations are done"))
        saved = False
        if SYNC in actions:
            self._sync(step, log_line=LOG in actions)
            if self.stop.on_any_rank(self.d):
                return self._stop(step, saved)
        rest = [a for a in actions if a in (CHECKPOINT, *EVALUATIONS)]
        for i, action in enumerate(rest):
            if action == CHECKPOINT:
                self._save(step)
                saved = True
                continue
            self._evaluate(step) if action == EVALUATE else self._hellaswag(step)
            if (i + 1 < len(rest) or step < self.max_steps) and self.stop.on_any_rank(self.d):
                return self._stop(step, saved)
        return False

    def _stop(self, step: int, saved: bool) -> bool:
        if not saved:
            self._save(step)
        self.log(f"stopped at step {step} by {self.stop.name or 'a signal on another rank'}; continue with "
                 "--init_from=resume")
        return True

    def _sync(self, step: int, log_line: bool) -> None:
        """Read the steps since the last sync from the device (the loop's only reads), record each of them and
        print the log line; after max_bad_steps non-finite steps in a row, save and raise TrainingDiverged."""
        window, self.pending = self.pending, []
        seconds = self.timer.read()
        has_aux = window[-1][2].aux_loss is not None
        values = torch.stack([torch.stack([r.loss.float(), r.grad_norm.float(), r.finite.float()]
                                          + ([r.aux_loss.float()] if has_aux else [])) for _, _, r, _, _ in window])
        recs, diverged_at = [], None
        for (s, lr, _, tokens, loss_tokens), v, sec in zip(window, values.tolist(), seconds):
            rec = step_record(s, tokens, lr, v, sec, self.cfg.total_batch_tokens, self.flops_per_token, self.peak,
                              self.d)
            rec["loss_tokens"] = loss_tokens
            if has_aux:
                rec["moe_aux_loss"] = v[3]  # this rank's; `loss` includes coef * this
            if self.first_record:  # reported apart (report.py leaves it out of the speed)
                rec["first_step_s"], self.first_record = sec, False
            recs.append(rec)
            self.losses.append(v[0])
            if self.scaler.is_enabled() or v[2]:
                self.bad_steps = 0
                if diverged_at is None:  # (once halted, no update is applied)
                    self.last_good_step = s
                continue
            self.bad_steps += 1
            self.log(f"warning: step {s}: non-finite loss {v[0]} / grad norm {v[1]}: update skipped "
                     f"({self.bad_steps} in a row)")
            if self.bad_steps >= self.bad_limit and diverged_at is None:
                diverged_at = s
        self.runlog.record_many(recs)
        self.since_log += seconds
        if log_line:
            shown = {**recs[-1], **speed(statistics.median(self.since_log), self.cfg.total_batch_tokens,
                                         self.flops_per_token, self.peak, self.d)}
            self.log(step_line(shown, self.max_steps))
            self.since_log = []
        if diverged_at is not None:
            self._save(step, diverged={"step": diverged_at, "bad_steps": self.bad_limit,
                                       "last_good_step": self.last_good_step})
            raise TrainingDiverged(
                f"stopping: {self.bad_limit} consecutive steps with a non-finite loss or gradient at step "
                f"{diverged_at}; {self.ckpts.latest} holds {weights_after(self.last_good_step)} (the last good "
                f"update). Lower lr, raise warmup_steps or use bf16/fp32, then continue it with --init_from=resume "
                f"--resume_diverged_at={diverged_at} (the data of the bad steps is skipped)")

    # --- checkpoint and evaluations ----------------------------------------------------------------------

    def _save(self, step: int, diverged: dict | None = None) -> None:
        t0 = time.perf_counter()
        if hasattr(self.optimizer, "consolidate_state_dict"):
            self.optimizer.consolidate_state_dict(to=0)  # collective: every rank takes part
        rngs = [rng_state(self.d.device)]
        if self.d.enabled:
            rngs = [None] * self.d.world_size
            dist.all_gather_object(rngs, rng_state(self.d.device))
        if self.d.master:
            self.ckpts.save({
                "model": self.raw_model.state_dict(),
                "model_config": self.raw_model.config.to_dict(),
                "train_config": asdict(self.cfg),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "step": step,
                "tokens_seen": self.tokens_seen,
                "loader": self.loader.state_dict(),
                "rng": rngs,
                "wandb_run_id": self.runlog.wandb_id,
                "best_val_loss": self.best_val,
                "last_good_step": self.last_good_step,
                "bad_steps": self.bad_steps,
                "diverged": diverged,  # set: init_from=auto/resume refuse it unless resume_diverged_at names it
            }, step)
            if self.best_step == step:
                self.ckpts.mark_best(step)
        if self.d.enabled:
            dist.barrier()
        # the time a preemption's grace period must cover (docs/reliability.md "Preemption")
        self.log(f"saved checkpoint {self.ckpts.latest} at step {step} in {time.perf_counter() - t0:.1f} s")

    def _evaluate(self, step: int) -> None:
        t0 = time.perf_counter()
        val = estimate_val_loss(self.eval_model, self.cfg, self.d, self.autocast)
        seconds = time.perf_counter() - t0  # with the save time, what a stop may have to wait for
        if val < self.best_val:
            self.best_val, self.best_step = val, step
            if self.d.master:
                self.ckpts.mark_best(step)  # this step's checkpoint, saved before its evaluations
        bpb = val / math.log(2) / self.bytes_per_token if self.bytes_per_token else None
        self.runlog.record({"step": step, "tokens": self.tokens_seen, "val_loss": val, "val_bpb": bpb,
                            "eval_s": seconds})
        self.log(f"step {step}: val loss {val:.4f}" + (f" | {bpb:.4f} bits/byte" if bpb else "")
                 + f" | {seconds:.1f} s")
        self.val_loss = val

    def _hellaswag(self, step: int) -> None:
        from eval_hellaswag import evaluate_hellaswag  # lazy: only runs that ask for it need it

        cfg, t0 = self.cfg, time.perf_counter()
        with self.autocast:  # the run's precision; log-softmax is fp32 inside
            hs = evaluate_hellaswag(self.raw_model, data_path=cfg.hellaswag_path or None,
                                    limit=cfg.hellaswag_limit or None,
                                    max_length=min(512, self.raw_model.config.block_size), device=self.d.device,
                                    rank=self.d.rank, world_size=self.d.world_size)
        seconds = time.perf_counter() - t0
        self.runlog.record({"step": step, "tokens": self.tokens_seen, "hellaswag_acc_norm": hs["acc_norm"],
                            "hellaswag_acc": hs["acc"], "eval_s": seconds})
        self.log(f"step {step}: hellaswag acc_norm {hs['acc_norm']:.4f} | {seconds:.1f} s")


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
