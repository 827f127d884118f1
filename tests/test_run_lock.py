"""One live run per out_dir (run_lock.py): a second train.py on a folder that a running train.py holds stops with
one line (exit 2) and leaves the folder alone; once the first is SIGKILLed (no handler, no cleanup) a new run
starts, because the OS drops the lock with the process."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from _shards import markov_dataset
from errors import UserError
from run_lock import LOCK_FILE, fcntl, run_lock
from test_train import args, env, run

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.skipif(fcntl is None, reason="no fcntl.flock on this platform: runs are not locked"),
              pytest.mark.e2e]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return markov_dataset(tmp_path_factory.mktemp("markov") / "data")


def test_second_run_refuses_a_live_folder_and_a_killed_run_leaves_no_lock(data, tmp_path):
    out = tmp_path / "out"
    live = args(data, out, max_steps=10**6, log_interval=10**5, eval_interval=0)  # trains until killed
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"), *live], cwd=REPO, env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None
        for line in first.stdout:
            if line.startswith("step 0/"):  # in the training loop, holding the lock
                break
        else:
            pytest.fail(f"the first run did not start: {first.stderr.read() if first.stderr else ''}")
        before = (out / "metrics.jsonl").read_text()
        second = subprocess.run([sys.executable, str(REPO / "train.py"), *args(data, out, max_steps=2)], cwd=REPO,
                                env=env(), capture_output=True, text=True, timeout=120)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert lines[0] == (f"error: out_dir {out} is in use by another training run (it holds {out / LOCK_FILE}); "
                            "wait for that run to end or stop it, or choose another out_dir")
        assert (out / "metrics.jsonl").read_text().startswith(before)  # not truncated by the refused run
        assert first.poll() is None  # and the first still runs
    finally:
        first.kill()  # SIGKILL: nothing in the process runs, only the OS cleans up
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    r = run(args(data, out, max_steps=2))  # the folder is free again
    assert "saved checkpoint" in r.stdout


def test_lock_is_exclusive_and_released_on_exit_and_on_error(tmp_path):
    out = tmp_path / "new" / "out"
    with run_lock(out):
        assert (out / LOCK_FILE).is_file()  # out_dir is created
        with pytest.raises(UserError, match="is in use by another training run"):  # a second open file
            with run_lock(out):
                pass
    with pytest.raises(RuntimeError):
        with run_lock(out):
            raise RuntimeError("the run failed")
    with run_lock(out):  # free after a normal exit and after an exception
        pass
    assert not (tmp_path / "new" / "out").exists()  # the folder it created and left empty is gone again
    out.mkdir()
    (out / LOCK_FILE).write_text("")  # as a SIGKILLed run leaves it: a file, unlocked
    with run_lock(out):
        pass
    assert out.is_dir() and not (out / LOCK_FILE).exists()


def test_lock_on_an_uncreatable_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot create out_dir .*; choose another out_dir"):
        with run_lock(tmp_path / "file" / "out"):
            pass
