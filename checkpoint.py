"""Checkpoint files (docs/design.md "Checkpoint"): atomic writes, safe loads, a run's rotation of them, and
building a model from one.

A checkpoint is a torch.save'd dict holding only tensors and plain Python values, so it loads with
weights_only=True (an untrusted file cannot run code). Written to a temp file in the same folder, fsync'd,
then os.replace'd: a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from errors import UserError
from hf import load_hf_gpt2
from model import GPT, GPTConfig

FORMAT_VERSION = 1


class CheckpointWriteError(UserError):
    """The checkpoint could not be written (disk full, unwritable folder); the previous one is unchanged."""


def _write(state: dict, f: io.BufferedWriter) -> None:
    """The one place the bytes are written (tests/fault_launcher.py replaces it to fail or stall mid-write)."""
    torch.save(state, f)


def save_checkpoint(state: dict, path: str | Path) -> None:
    path = Path(path)
    for stale in path.parent.glob(path.name + ".*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            _write({"format": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {e.strerror or e}; free disk space or "
                                       "choose a writable out_dir (the previous checkpoint, if any, is unchanged)"
                                       ) from e
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path (train.py writes <out_dir>/ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():  # nothing of it was run
            raise UserError(f"{path} holds Python objects other than tensors and plain values; refused to load "
                            "it (unpickling an untrusted file can run code); use a checkpoint written by train.py"
                            ) from e
        raise UserError(f"{path} is not a readable checkpoint (truncated or not a torch.save file): "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; use an intact copy "
                        "or another checkpoint") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project (no 'model' / 'model_config')")
    if ckpt.get("format", 1) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer version (format {ckpt['format']} > {FORMAT_VERSION}); "
                        "update this code")
    return ckpt


class RunCheckpoints:
    """A run's checkpoints in out_dir. ckpt.pt is always the newest (the name evaluation commands take);
    each save also hard-links it as ckpt_<step>.pt, of which the newest `keep` stay, so a corrupt file or a
    late blow-up costs one checkpoint interval, not the run. Hard links cost no disk or write time for the
    newest; each older one kept holds its own copy (1.5 GB at 124M). With keep_best, ckpt_best.pt is a link
    to the checkpoint of the lowest val loss (needs keep >= 1). keep=0: only ckpt.pt."""

    def __init__(self, out_dir: Path, keep: int, keep_best: bool = False):
        self.dir, self.keep, self.keep_best = Path(out_dir), keep, keep_best
        self.latest = self.dir / "ckpt.pt"
        self.best = self.dir / "ckpt_best.pt"

    def step_path(self, step: int) -> Path:
        return self.dir / f"ckpt_{step:08d}.pt"

    def step_files(self) -> list[Path]:
        """ckpt_<step>.pt files, newest first."""
        return sorted((p for p in self.dir.glob("ckpt_[0-9]*.pt") if p.stem[5:].isdigit()), reverse=True)

    def newest_first(self) -> list[Path]:
        """Every checkpoint a resume may start from, newest first (ckpt.pt, then older step files)."""
        files = [self.latest] if self.latest.is_file() else []
        return files + [p for p in self.step_files() if not (files and _same_file(p, self.latest))]

    def save(self, state: dict, step: int) -> None:
        for stale in self.dir.glob("ckpt*.pt.link.tmp"):  # left by a process killed while linking
            stale.unlink(missing_ok=True)
        for newer in self.step_files():  # from a run started over, or past a corrupt one we fell back from
            if int(newer.stem[5:]) > step:
                newer.unlink()
        save_checkpoint(state, self.latest)
        if self.keep:
            _link(self.latest, self.step_path(step))
            for old in self.step_files()[self.keep:]:
                old.unlink(missing_ok=True)  # a ckpt_best.pt link keeps its own copy of the data alive

    def remove_all(self) -> int:
        """Delete every checkpoint of the run (ckpt.pt, the step files, ckpt_best.pt); the number removed."""
        files = [p for p in (self.latest, self.best) if p.is_file()] + self.step_files()
        for p in files:
            p.unlink(missing_ok=True)
        return len(files)

    def mark_best(self, step: int) -> None:
        """ckpt_best.pt <- the checkpoint of `step` (call it when that step's val loss is the lowest yet)."""
        if self.keep_best and self.step_path(step).is_file():
            _link(self.step_path(step), self.best)

    def load_newest(self, log: Callable[[str], None]) -> tuple[dict, Path] | None:
        """The newest checkpoint that loads; one warning line for each that does not. None: no checkpoint."""
        candidates = self.newest_first()
        errors = []
        for path in candidates:
            try:
                return load_checkpoint(path), path
            except UserError as e:
                errors.append(str(e))
                log(f"warning: {e}" + ("; trying the previous checkpoint" if path != candidates[-1] else ""))
        if errors:
            raise UserError(f"no checkpoint in {self.dir} loads ({len(errors)} tried; the newest: {errors[0]})")
        return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _link(src: Path, dst: Path) -> None:
    """dst becomes another name of src's data, atomically (a hard link: no copy, no extra disk)."""
    tmp = dst.with_name(dst.name + ".link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError as e:  # a filesystem without hard links: only ckpt.pt is kept
        warnings.warn(f"cannot hard-link {src} as {dst.name} ({e.strerror}): older checkpoints are not kept",
                      stacklevel=2)
        return
    os.replace(tmp, dst)


def model_from_checkpoint(ckpt: dict) -> GPT:
    model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not fit its model_config: {str(e).splitlines()[1:2]}") from e
    return model


def load_model(path: str | Path) -> GPT:
    """A GPT from one of our checkpoint files, or from a Hugging Face GPT-2 folder or hub name."""
    p = Path(path)
    if p.is_file() or (not p.exists() and (p.suffix in (".pt", ".pth") or p.is_absolute() or str(path)[:1] == ".")):
        return model_from_checkpoint(load_checkpoint(p))  # a missing file path: "does not exist", not a hub error
    return load_hf_gpt2(path)
