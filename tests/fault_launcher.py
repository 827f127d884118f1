"""Run train.py with test-only faults patched in (tests/test_faults.py):

    python tests/fault_launcher.py '<faults json>' <train.py args...>
    torchrun --nproc_per_node=2 tests/fault_launcher.py '<faults json>' <train.py args...>

Faults (every key optional):
  "nan_steps": [k, ...]   the training loss of steps k is multiplied by NaN (evaluation is untouched)
  "nan_from": k           the same for every step from k on
  "crash" / "hang": {"step": k, "rank": r, "once": marker_path}
                          rank r (default 0) exits with code 17 / sleeps for good at the start of step k's
                          update, after step k's evaluation; with "once", only if marker_path does not exist
                          yet (it is then created), so a restarted worker runs on
  "data_dir": {"rank": r, "path": p}
                          rank r reads the dataset at p (as a node with its own, different copy would)
  "out_dir": {"rank": r, "path": p}
                          rank r writes to and resumes from p (as a node whose out_dir is not shared would)
  "ckpt_write": "enospc" | "slow:SECONDS"
                          every checkpoint write stops half-way and fails like a full disk, or prints
                          "checkpoint write in progress", sleeps, then finishes (so a test can kill it mid-write)
  "slow": {"step_s": s, "hellaswag_s": h}
                          every rank prints "slow: step k" at the start of optimizer step k, then sleeps s
                          seconds (so a test can signal inside a known step, after the sync before it), and
                          sleeps h seconds (default 0) before every forward pass in eval mode without targets
                          (HellaSwag's scoring; the val loss passes targets)

The hooks are train.lr_at (called once at the start of every optimizer step), GPT.forward,
checkpoint._write and train.load_config; train.py itself knows nothing of faults. Exit codes are those of
`python train.py`.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import checkpoint  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402
from errors import run_main  # noqa: E402

KINDS = {"nan_steps", "nan_from", "crash", "hang", "ckpt_write", "data_dir", "out_dir", "slow"}


def install(faults: dict) -> None:
    if set(faults) - KINDS:  # a misspelt fault would silently test nothing
        sys.exit(f"fault_launcher: unknown faults {sorted(set(faults) - KINDS)}; known: {sorted(KINDS)}")
    current = {"step": -1}  # the optimizer step in progress, as last passed to lr_at
    rank = int(os.environ.get("RANK", 0))
    real_lr_at, real_forward = train.lr_at, model.GPT.forward

    slow = faults.get("slow") or {}

    def lr_at(step: int, cfg: train.TrainConfig, max_steps: int) -> float:
        current["step"] = step
        if slow.get("step_s"):
            print(f"slow: step {step}", flush=True)
            time.sleep(float(slow["step_s"]))
        for kind in ("crash", "hang"):
            f = faults.get(kind)
            if not f or f["step"] != step or f.get("rank", 0) != rank:
                continue
            if f.get("once"):
                if Path(f["once"]).exists():
                    continue
                Path(f["once"]).touch()
            print(f"injected fault: {kind} on rank {rank} at step {step}", file=sys.stderr, flush=True)
            if kind == "crash":
                os._exit(17)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # hung for good, but torchrun may still stop it
            time.sleep(3600)
        return real_lr_at(step, cfg, max_steps)

    def forward(self: model.GPT, *args: object, **kwargs: object) -> tuple:
        targets = args[1] if len(args) > 1 else kwargs.get("targets")
        if slow.get("hellaswag_s") and not self.training and targets is None:
            time.sleep(float(slow["hellaswag_s"]))
        out = real_forward(self, *args, **kwargs)
        step = current["step"]
        if self.training and out[1] is not None and (
                step in faults.get("nan_steps", ()) or 0 <= faults.get("nan_from", -1) <= step):
            out = (out[0], out[1] * float("nan"), *out[2:])
        return out

    def write(state: dict, f: io.BufferedWriter) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        if faults["ckpt_write"] == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        print("checkpoint write in progress", flush=True)
        time.sleep(float(faults["ckpt_write"].split(":")[1]))
        f.write(data[len(data) // 2 :])

    def load_config(argv: list[str]) -> train.TrainConfig:
        cfg = real_load_config(argv)
        for field in ("data_dir", "out_dir"):
            f = faults.get(field)
            if f and f["rank"] == rank:
                cfg = dataclasses.replace(cfg, **{field: f["path"]})
        return cfg

    real_load_config = train.load_config
    train.load_config = load_config
    train.lr_at = lr_at
    model.GPT.forward = forward
    if faults.get("ckpt_write"):
        checkpoint._write = write


if __name__ == "__main__":
    install(json.loads(sys.argv[1]))
    sys.argv = [str(REPO / "train.py"), *sys.argv[2:]]  # as if train.py had been run
    run_main(train.main)
