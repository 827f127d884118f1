"""What watches a training run from outside the step: the metrics log (metrics.jsonl + wandb), the step timer
and the stop signal. train.py's loop uses them; none of them touches the model."""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from common import Dist, machine_info
from errors import UserError
from train_config import ConfigError, TrainConfig


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

    def on_any_rank(self, d: Dist) -> bool:
        """Whether any rank was asked to stop (one all-reduce: call it at log steps only)."""
        if not d.enabled:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=d.device)
        dist.all_reduce(flag)
        return flag.item() > 0

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def read_metrics(run: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl (`run`: its out_dir, or the file). A last line that does not parse
    (a run killed mid-write tears it) is dropped with a warning, so it cannot block every later resume; a bad
    line before the last is damage, and one UserError names it."""
    path = Path(run) / "metrics.jsonl" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise UserError(f"{path} does not exist; point at a train.py out_dir")
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            records.append(rec)
        elif i == len(lines) - 1:
            warnings.warn(f"{path} line {n} is not a metrics record (torn by a crash?): dropped", stacklevel=2)
        else:
            raise UserError(f"{path}:{n}: not a metrics record (one JSON object with an integer step per line); "
                            "the file is damaged: restore it or remove that line")
    return records


def wandb_resume_kwargs(wandb_module: object, run_id: str, step: int, resuming: bool) -> list[dict]:
    """The wandb.init arguments to try in order. A resumed run first asks to continue its wandb run from the
    checkpoint's step: wandb rejects steps at or below the last one logged, so without a rewind the steps redone
    after a crash are dropped from the curves. `resume_from="<id>?_step=<n>"` (wandb >= 0.17.1) forks the history
    there, but it is a private-preview feature of the W&B service that most accounts are refused; then the run is
    continued plainly (`resume="allow"`)."""
    import inspect

    plain = {"id": run_id, "resume": "allow"}
    if resuming and "resume_from" in inspect.signature(wandb_module.init).parameters:
        return [{"resume_from": f"{run_id}?_step={step}"}, plain]
    if resuming:
        warnings.warn("this wandb cannot rewind a run (no resume_from): steps redone after the checkpoint will "
                      "be rejected by wandb; upgrade wandb to >= 0.17.1", stacklevel=2)
    return [plain]


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def start_wandb(cfg: TrainConfig, out_dir: Path, run_id: str, step: int, resuming: bool) -> object | None:
    """The wandb run, or None with one warning: logging never stops training (metrics.jsonl has every record)."""
    try:
        import wandb

        attempts = wandb_resume_kwargs(wandb, run_id, step, resuming)
    except Exception as e:  # not installed, or broken
        warnings.warn(f"wandb_log=True but wandb cannot be used ({_first_line(e)}); training goes on without "
                      "wandb", stacklevel=2)
        return None
    for i, kw in enumerate(attempts):
        try:
            return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=asdict(cfg),
                              dir=str(out_dir), **kw)
        except Exception as e:  # refused (rewind not enabled), offline, bad key: try the next, then go on
            if i + 1 < len(attempts):
                warnings.warn(f"wandb refused to rewind run {run_id} to step {step} ({_first_line(e)}); continuing "
                              "it without a rewind: wandb drops the redone steps from its curves", stacklevel=2)
            else:
                warnings.warn(f"wandb could not start ({_first_line(e)}); training goes on without wandb "
                              "(metrics.jsonl has every record)", stacklevel=2)
    return None


EVALUATION_KEYS = {"evaluate": "val_loss", "hellaswag": "hellaswag_acc_norm"}  # schedule.py's name -> its record


class RunLog:
    """metrics.jsonl (one JSON object per record, on rank 0) and, if asked, the wandb run.

    A resume from step s's checkpoint drops what the killed run recorded after that checkpoint (its steps are
    redone), keeping only step s's evaluations (run after the checkpoint): `evaluated` names them on every rank
    (rank 0 reads the file), so the resumed run owes only the rest."""

    def __init__(self, cfg: TrainConfig, d: Dist, out_dir: Path, step: int, max_steps: int, wandb_id: str | None,
                 resumed: bool = False):
        self.path = out_dir / "metrics.jsonl"
        self.master = d.master
        self.wandb_run = None
        self.wandb_id = wandb_id
        self.evaluated: dict[str, dict] = {}  # "evaluate" / "hellaswag" -> step s's record of it, if kept
        if d.master:
            self._open(cfg, d, out_dir, step, max_steps, wandb_id, resumed)
        if d.enabled:  # every rank runs the evaluations the resume owes (they are collective): rank 0's word
            shared = [self.evaluated]
            dist.broadcast_object_list(shared, src=0)
            self.evaluated = shared[0]

    def _open(self, cfg: TrainConfig, d: Dist, out_dir: Path, step: int, max_steps: int, wandb_id: str | None,
              resumed: bool) -> None:
        """Rank 0: the folder, the record repaired for a resume, the wandb run and the launch record."""
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create out_dir {out_dir}: {e.strerror}; choose another out_dir") from e
        if self.path.is_file():
            kept = [r for r in read_metrics(self.path) if resumed and (
                r["step"] < step or (r["step"] == step and any(k in r for k in EVALUATION_KEYS.values())))]
            self._rewrite(kept)
            self.evaluated = {name: r for r in kept if r["step"] == step
                              for name, key in EVALUATION_KEYS.items() if key in r}
        if cfg.wandb_log:
            self.wandb_id = wandb_id or secrets.token_hex(4)  # kept in the checkpoint: a resume continues it
            self.wandb_run = start_wandb(cfg, out_dir, self.wandb_id, step, resuming=wandb_id is not None and step > 0)
        if step < max_steps or max_steps == 0:  # what ran and where, for report.py (a finished run's resume: nothing)
            self.record({"step": step, "launch": {"argv": sys.argv, "config": asdict(cfg),
                                                  "machine": machine_info(d.device, d.world_size)}}, to_wandb=False)

    def _rewrite(self, records: list[dict]) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, self.path)

    def record(self, rec: dict, to_wandb: bool = True) -> None:
        self.record_many([rec], to_wandb)

    def record_many(self, recs: list[dict], to_wandb: bool = True) -> None:
        if not self.master:
            return
        now = round(time.time(), 3)  # wall clock (Unix s): report.py's wall time
        recs = [{**rec, "time": now} for rec in recs]
        try:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(rec) + "\n" for rec in recs))
        except OSError as e:  # disk full, out_dir removed or read-only
            raise ConfigError(f"cannot write {self.path}: {e.strerror}; free disk space or choose another "
                              f"out_dir, then continue with --init_from=resume") from e
        if to_wandb and self.wandb_run is not None:
            try:
                for rec in recs:
                    self.wandb_run.log({k: v for k, v in rec.items() if k not in ("step", "time") and v is not None},
                                       step=rec["step"])
            except Exception as e:  # a logging failure never stops training
                warnings.warn(f"wandb failed to log step {rec['step']} ({_first_line(e)}); training goes on "
                              "without wandb (metrics.jsonl has every record)", stacklevel=2)
                self.wandb_run = None

    def close(self) -> None:
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as e:
                warnings.warn(f"wandb failed to finish its run ({_first_line(e)})", stacklevel=2)


def step_record(step: int, tokens: int, lr: float, values: list[float], step_s: float, batch_tokens: int,
                flops_per_token: float, peak: float | None, d: Dist) -> dict:
    """The metrics record of one optimizer step: its loss and grad norm (`values`) and its speed."""
    loss, norm = values[:2]
    return {"step": step, "tokens": tokens, "loss": loss, "lr": lr, "grad_norm": norm,
            **speed(step_s, batch_tokens, flops_per_token, peak, d),
            "peak_mem_gib": torch.cuda.max_memory_allocated(d.device) / 2**30 if d.device.type == "cuda" else None}


def speed(step_s: float, batch_tokens: int, flops_per_token: float, peak: float | None, d: Dist) -> dict:
    tok_s = batch_tokens / step_s
    return {"tok_per_s": tok_s, "mfu": flops_per_token * tok_s / d.world_size / peak if peak else None,
            "step_ms": step_s * 1000}


def step_line(rec: dict, max_steps: int) -> str:
    mfu, mem = rec["mfu"], rec["peak_mem_gib"]
    return (f"step {rec['step']}/{max_steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
            f"norm {rec['grad_norm']:.3f} | {rec['tok_per_s']:,.0f} tok/s | {rec['step_ms']:.0f} ms"
            + (f" | mfu {mfu:.1%}" if mfu is not None else "") + (f" | mem {mem:.1f} GiB" if mem is not None else "")
            + (f" | first step {rec['first_step_s']:.1f} s (warm-up)" if "first_step_s" in rec else ""))
