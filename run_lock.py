"""One live training run per out_dir: rank 0 holds an exclusive flock on out_dir/run.lock while it trains.

Two runs on one folder would truncate each other's metrics.jsonl and overwrite each other's ckpt.pt. The lock
belongs to the open file, not to the file's existence: the OS drops it when the process ends in any way (exit,
exception, SIGKILL, OOM kill), so a killed run never leaves the folder locked (only an unlocked empty file, which
the next run takes over).
"""

from __future__ import annotations

import errno
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from errors import UserError

try:
    import fcntl
except ImportError:  # no flock (Windows): runs there are not guarded against sharing a folder
    fcntl = None

LOCK_FILE = "run.lock"


@contextmanager
def run_lock(out_dir: str | Path) -> Iterator[None]:
    """Hold out_dir's run lock for the body (creating out_dir); UserError at once if another process holds it.
    On the way out the lock file is removed, and out_dir too if this call created it and it is still empty, so
    a run refused for bad input leaves no trace."""
    out = Path(out_dir)
    if fcntl is None:
        yield
        return
    path, created = out / LOCK_FILE, not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # (not inherited by exec'd children)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(f"out_dir {out} is in use by another training run (it holds {path}); wait for "
                                "that run to end or stop it, or choose another out_dir") from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                warnings.warn(f"{out} is on a filesystem without file locks: not guarding it against a second "
                              "run", stacklevel=3)
            if _same_file(fd, path):
                break
            os.close(fd)  # the previous holder removed the file between our open and flock: lock the new one
    except OSError as e:
        raise UserError(f"cannot create out_dir {out}: {e.strerror}; choose another out_dir") from e
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked, so no one locks a file that is going away unseen
        os.close(fd)  # releases the lock
        if created:
            try:
                out.rmdir()
            except OSError:  # not empty: the run wrote its files
                pass


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
