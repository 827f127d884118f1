"""What watches a training run from outside the step: the metrics log (metrics.jsonl + wandb), the step timer
and the stop signal. train.py's loop uses them; none of them touches the model."""

from __future__ import annotations

import json
import os
import secrets
import signal
import statistics
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


def wandb_resume_kwargs(wandb_module: object, run_id: str, step: int, resuming: bool) -> dict:
    """A resumed run continues its wandb run from the checkpoint's step: wandb rejects steps at or below the
    last one logged, so without a rewind the steps redone after a crash would be dropped from the curves.
    `resume_from="<id>?_step=<n>"` (wandb >= 0.17.1) forks the history there."""
    import inspect

    if resuming and "resume_from" in inspect.signature(wandb_module.init).parameters:
        return {"resume_from": f"{run_id}?_step={step}"}
    if resuming:
        warnings.warn("this wandb cannot rewind a run (no resume_from): steps redone after the checkpoint will "
                      "be rejected by wandb; upgrade wandb to >= 0.17.1", stacklevel=2)
    return {"id": run_id, "resume": "allow"}


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
        if step < max_steps and self.path.is_file():  # (a finished run resumed keeps its final val record)
            self._rewrite([r for r in read_metrics(self.path) if r["step"] < step])  # drop what a killed run
            # wrote after its last checkpoint: the steps are redone
        if cfg.wandb_log:
            import wandb

            resuming = wandb_id is not None and step > 0
            self.wandb_id = wandb_id or secrets.token_hex(4)  # kept in the checkpoint: a resume continues it
            self.wandb_run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None,
                                        config=asdict(cfg), dir=str(out_dir),
                                        **wandb_resume_kwargs(wandb, self.wandb_id, step, resuming))
        if step < max_steps or max_steps == 0:  # what ran and where, for report.py (a finished run's resume: nothing)
            self.record({"step": step, "launch": {"argv": sys.argv, "config": asdict(cfg),
                                                  "machine": machine_info(d.device, d.world_size)}}, to_wandb=False)

    def _rewrite(self, records: list[dict]) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
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


def step_record(step: int, tokens: int, lr: float, values: list[float], seconds: list[float], batch_tokens: int,
                flops_per_token: float, peak: float | None, d: Dist) -> dict:
    """The metrics record of a log step: its loss and grad norm (`values`), and the median speed over the
    steps since the last log (a median, so one slow step — a checkpoint, an evaluation — does not skew it)."""
    step_s = statistics.median(seconds)
    tok_s = batch_tokens / step_s
    loss, norm = values[:2]
    return {"step": step, "tokens": tokens, "loss": loss, "lr": lr, "grad_norm": norm, "tok_per_s": tok_s,
            "mfu": flops_per_token * tok_s / d.world_size / peak if peak else None, "step_ms": step_s * 1000,
            "peak_mem_gib": torch.cuda.max_memory_allocated(d.device) / 2**30 if d.device.type == "cuda" else None}


def step_line(rec: dict, max_steps: int) -> str:
    mfu, mem = rec["mfu"], rec["peak_mem_gib"]
    return (f"step {rec['step']}/{max_steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
            f"norm {rec['grad_norm']:.3f} | {rec['tok_per_s']:,.0f} tok/s | {rec['step_ms']:.0f} ms"
            + (f" | mfu {mfu:.1%}" if mfu is not None else "") + (f" | mem {mem:.1f} GiB" if mem is not None else "")
            + (f" | first step {rec['first_step_s']:.1f} s (warm-up)" if "first_step_s" in rec else ""))
