"""Run prepare_data.py with test-only faults patched in (tests/test_prepare_resume.py):

    python tests/prepare_fault_launcher.py '<faults json>' <prepare_data.py args...>

Faults (every key optional):
  "exit_after_shards": n    the main process exits at once (os._exit(17): no cleanup, as under SIGKILL) right
                            after renaming its n-th finished shard, before progress.json can record it
  "exit_after_records": n   the same right after it writes progress.json for the n-th time
  "exit_before_meta": true  the same when it is about to write meta.json (every shard is finished)
  "worker_exit_at_doc": i   the pool worker given the batch that holds document i tokenizes half of the batch,
                            then exits (os._exit(3)), as a worker killed by the out-of-memory killer would
  "batch_sleep_s": t        sleep t seconds before each batch is written, so that a test can SIGKILL the run
                            at a moment of its choosing

The hooks are prepare_data's ShardWriter._finish_shard, save_progress, write_meta, encode_batch and encoded;
prepare_data.py itself knows nothing of faults. Exit codes are those of `python prepare_data.py`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import prepare_data  # noqa: E402
from errors import run_main  # noqa: E402

KINDS = {"exit_after_shards", "exit_after_records", "exit_before_meta", "worker_exit_at_doc", "batch_sleep_s"}
FAULTS: dict = {}
MAIN_PID = os.getpid()
real_encode_batch = prepare_data.encode_batch


def encode_batch_or_die(batch: tuple) -> tuple:
    """Module-level, so that the forked workers unpickle it by name."""
    texts, is_val, (_, end) = batch
    if os.getpid() != MAIN_PID and end - len(texts) <= FAULTS["worker_exit_at_doc"] < end:
        real_encode_batch((texts[: len(texts) // 2], is_val[: len(texts) // 2], batch[2]))
        print(f"injected fault: worker {os.getpid()} exits", file=sys.stderr, flush=True)
        os._exit(3)
    return real_encode_batch(batch)


def install(faults: dict) -> None:
    if set(faults) - KINDS:  # a misspelt fault would silently test nothing
        sys.exit(f"prepare_fault_launcher: unknown faults {sorted(set(faults) - KINDS)}; known: {sorted(KINDS)}")
    FAULTS.update(faults)
    counts = {"shards": 0, "records": 0}

    def after(kind: str, key: str, real):
        def wrapped(*args: object, **kwargs: object) -> object:
            out = real(*args, **kwargs)
            counts[kind] += 1
            if counts[kind] == faults.get(key):
                os._exit(17)
            return out
        return wrapped

    writer = prepare_data.ShardWriter
    writer._finish_shard = after("shards", "exit_after_shards", writer._finish_shard)
    prepare_data.save_progress = after("records", "exit_after_records", prepare_data.save_progress)
    if faults.get("exit_before_meta"):
        prepare_data.write_meta = lambda *a, **k: os._exit(17)
    if "worker_exit_at_doc" in faults:
        prepare_data.encode_batch = encode_batch_or_die
    if "batch_sleep_s" in faults:
        real_encoded = prepare_data.encoded

        def encoded(*args: object, **kwargs: object):
            for result in real_encoded(*args, **kwargs):
                time.sleep(faults["batch_sleep_s"])
                yield result

        prepare_data.encoded = encoded


if __name__ == "__main__":
    install(json.loads(sys.argv[1]))
    sys.argv = [str(REPO / "prepare_data.py"), *sys.argv[2:]]  # as if prepare_data.py had been run
    run_main(prepare_data.main)
