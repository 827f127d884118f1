"""prepare_data.py stopped part-way and started again: the main process killed at chosen points (no cleanup, as
under SIGKILL), SIGKILLed from outside, or one of its tokenizer workers killed mid-batch. Each restarted run must
write exactly the bytes (shards and meta.json) of a run nobody interrupted. Also: shard hashes and --verify, the
per-split text byte counts, the CPU count default, and reading OpenWebText under datasets>=4. Faults are
injected by tests/prepare_fault_launcher.py, which patches prepare_data's functions from outside."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import prepare_data
from conftest import REPO, shared_file
from errors import run_main
from test_prepare_data import assert_one_line_error, cli, decode_docs, run, shard_bytes, split_tokens

pytestmark = pytest.mark.e2e  # whole programs: the quick loop (-m "not e2e") leaves them out

# Tiny Shakespeare in 15 train + 2 val shards, written over ~56 batches by 2 workers
ARGS = ["--dataset", "shakespeare", "--shard-tokens", 20_000, "--batch-chars", 20_000, "--num-proc", 2]


@pytest.fixture(scope="module")
def src() -> Path:
    return shared_file("tinyshakespeare.txt")


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    run(*ARGS, "--shakespeare-path", src, "--out-dir", out)
    return out


def launch(faults: dict, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tests" / "prepare_fault_launcher.py"), json.dumps(faults),
                           *map(str, args), "--no-progress"], capture_output=True, text=True, timeout=120)


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def recorded_shards(out: Path) -> dict[str, tuple[int, int]]:
    """The finished shards progress.json records, with (inode, mtime): a resumed run must not rewrite them."""
    prog = json.loads((out / prepare_data.PROGRESS).read_text())
    names = [e["file"] for s in prog["splits"].values() for e in s["shards"]]
    return {n: ((out / n).stat().st_ino, (out / n).stat().st_mtime_ns) for n in names}


def resume_and_compare(out: Path, reference: Path, *args: object) -> subprocess.CompletedProcess:
    kept = recorded_shards(out)
    r = cli(*args, "--out-dir", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"resuming {out} from document "), r.stdout
    assert files(out) == files(reference)  # every shard and meta.json; no progress.json or .tmp left
    assert {n: ((out / n).stat().st_ino, (out / n).stat().st_mtime_ns) for n in kept} == kept
    return r


@pytest.mark.parametrize("faults", [
    {"exit_after_records": 1},  # first record: val and train both mid-shard
    {"exit_after_shards": 5},  # a shard finished after the last record: its recorded prefix is reused
    {"exit_after_shards": 12},
    {"exit_before_meta": True},  # everything written but meta.json
])
def test_main_process_killed_then_resumed_equals_uninterrupted(src, reference, tmp_path, faults):
    r = launch(faults, *ARGS, "--shakespeare-path", src, "--out-dir", tmp_path)
    assert r.returncode == 17, r.stderr
    assert (tmp_path / prepare_data.PROGRESS).is_file() and not (tmp_path / "meta.json").exists()
    # resumed with other batches and one process: neither changes the bytes
    resume_and_compare(tmp_path, reference, *ARGS, "--shakespeare-path", src, "--num-proc", 1, "--batch-chars", 7_000)


def test_resume_with_nothing_left_to_read(tmp_path):
    """Every batch ends exactly at a shard's end, so the last record is at the end of the input: the resumed run
    reads no document and only writes meta.json."""
    texts = [f"{chr(ord('a') + i)} {' '.join(['word'] * 99)}" for i in range(20)]  # all of one length
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    per_doc = {1 + len(t) for t in prepare_data.get_tokenizer().encode_ordinary_batch(texts)}
    assert len(per_doc) == 1  # and of one token count
    args = ["--files", tmp_path / "docs.jsonl", "--val-fraction", 0, "--shard-tokens", 2 * per_doc.pop(),
            "--batch-chars", 2 * len(texts[0]), "--num-proc", 2]  # 2 documents per batch, and per shard
    run(*args, "--out-dir", tmp_path / "ref")
    assert len(json.loads((tmp_path / "ref" / "meta.json").read_text())["splits"]["train"]) == 10
    r = launch({"exit_before_meta": True}, *args, "--out-dir", tmp_path / "out")
    assert r.returncode == 17, r.stderr
    assert json.loads((tmp_path / "out" / prepare_data.PROGRESS).read_text())["position"] == {"records": 20,
                                                                                               "docs": 20}
    resume_and_compare(tmp_path / "out", tmp_path / "ref", *args)


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_from_outside_then_resumed_equals_uninterrupted(src, reference, tmp_path, seed):
    cmd = [sys.executable, str(REPO / "tests" / "prepare_fault_launcher.py"), json.dumps({"batch_sleep_s": 0.03}),
           *map(str, ARGS), "--shakespeare-path", str(src), "--out-dir", str(tmp_path), "--no-progress"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300  # a wait for the first record, not a speed limit
    while not (tmp_path / prepare_data.PROGRESS).exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(random.Random(seed).uniform(0.0, 0.6))  # somewhere in the remaining ~1.5 s of batches
    p.send_signal(signal.SIGKILL)
    _, err = p.communicate(timeout=30)  # EOF on stderr: the orphaned workers exited too, holding it no longer
    assert p.returncode == -signal.SIGKILL, err  # killed, not finished on its own
    assert not (tmp_path / "meta.json").exists()
    resume_and_compare(tmp_path, reference, *ARGS, "--shakespeare-path", src)


def test_dead_worker_is_one_line_and_the_rerun_resumes(src, reference, tmp_path):
    r = launch({"worker_exit_at_doc": 4_000}, *ARGS, "--shakespeare-path", src, "--out-dir", tmp_path)
    lines = [x for x in r.stderr.splitlines() if not x.startswith("injected fault")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "tokenizer worker process died" in lines[0] and "finished shards are kept" in lines[0], lines
    assert "running the same command again resumes" in lines[0]
    assert not (tmp_path / "meta.json").exists() and len(recorded_shards(tmp_path)) >= 5  # ~8 shards before doc 4000
    resume_and_compare(tmp_path, reference, *ARGS, "--shakespeare-path", src)


def test_partial_run_of_another_command_is_refused_then_restart(src, tmp_path):
    r = launch({"exit_after_records": 2}, *ARGS, "--shakespeare-path", src, "--out-dir", tmp_path / "out")
    assert r.returncode == 17, r.stderr
    before = files(tmp_path / "out")
    r = cli(*ARGS, "--shakespeare-path", src, "--seed", 7, "--out-dir", tmp_path / "out")
    assert_one_line_error(r, "holds a partial run of another command", "seed: 1337 there, 7 now", "--restart")
    assert files(tmp_path / "out") == before  # nothing touched
    r = cli(*ARGS, "--shakespeare-path", src, "--seed", 7, "--out-dir", tmp_path / "out", "--restart")
    assert r.returncode == 0 and "resuming" not in r.stdout, r.stderr
    run(*ARGS, "--shakespeare-path", src, "--seed", 7, "--out-dir", tmp_path / "ref7")
    assert files(tmp_path / "out") == files(tmp_path / "ref7")


def test_open_shard_changed_after_the_record_is_refused(src, tmp_path):
    r = launch({"exit_after_records": 3}, *ARGS, "--shakespeare-path", src, "--out-dir", tmp_path)
    assert r.returncode == 17, r.stderr
    partial = json.loads((tmp_path / prepare_data.PROGRESS).read_text())["splits"]["val"]["partial"]
    with open(tmp_path / partial["file"], "r+b") as f:  # a byte inside the recorded part
        f.seek(10)
        b = f.read(1)
        f.seek(10)
        f.write(bytes([b[0] ^ 1]))
    r = cli(*ARGS, "--shakespeare-path", src, "--out-dir", tmp_path)
    assert_one_line_error(r, partial["file"], "changed since progress.json recorded them", "--restart")


# ------------------------------------------------------------------------------------- integrity and bytes
def test_verify_names_changed_and_missing_shards(reference, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(reference, d)
    meta = json.loads((d / "meta.json").read_text())
    n = sum(len(v) for v in meta["splits"].values())
    assert n == 17
    for split in ("train", "val"):  # meta.json's sha256 is hashlib's of the file as written
        for e in meta["splits"][split]:
            assert e["sha256"] == hashlib.sha256((d / e["file"]).read_bytes()).hexdigest()
    r = cli("--verify", d)
    assert r.returncode == 0 and r.stdout.strip() == f"{d}: all 17 shards ok (sizes and sha256 as meta.json records)"
    for name in ("train_000003.bin", "val_000001.bin"):  # one flipped bit each, sizes unchanged
        data = bytearray((d / name).read_bytes())
        data[len(data) // 2] ^= 0x10
        (d / name).write_bytes(bytes(data))
    (d / "train_000007.bin").unlink()
    r = cli("--verify", d)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 4 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"{d / 'train_000003.bin'}: changed (sha256 ")
    assert lines[1] == f"{d / 'train_000007.bin'}: missing"
    assert lines[2].startswith(f"{d / 'val_000001.bin'}: changed (sha256 ")
    assert lines[3].startswith(f"error: 3 of 17 shards in {d} are missing or changed")
    for e in meta["splits"]["train"]:  # meta.json of an older prepare_data.py: no hashes to check
        del e["sha256"]
    for e in meta["splits"]["val"]:
        del e["sha256"]
    shutil.rmtree(d)
    shutil.copytree(reference, d)
    (d / "meta.json").write_text(json.dumps(meta))
    assert_one_line_error(cli("--verify", d), "records no sha256 for 17 of 17 shards", "--overwrite")


def test_text_bytes_of_tiny_shakespeare_are_the_file_less_its_separators(src, reference):
    meta = json.loads((reference / "meta.json").read_text())
    n_docs = sum(e["docs"] for split in meta["splits"].values() for e in split)
    assert n_docs == len(src.read_text().split("\n\n"))  # no blank speech was dropped
    assert sum(meta["text_bytes"].values()) == src.stat().st_size - 2 * (n_docs - 1)


def test_text_bytes_of_a_hand_checked_corpus(tmp_path):
    docs = ["hello", "héllo wörld", "   ", "日本", "a\nb", "<|endoftext|> is text here"]
    # hand count, UTF-8: 5; 13 (é and ö are 2 bytes each); blank: dropped; 6 (3 each); 3; 26
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    summary = run("--files", tmp_path / "c.jsonl", "--out-dir", tmp_path / "out", "--val-docs", 2)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["text_bytes"] == {"train": 6 + 3 + 26, "val": 5 + 13} == summary["text_bytes"]
    for split in ("train", "val"):  # and what the shards decode back to
        assert meta["text_bytes"][split] == sum(len(t.encode()) for t in decode_docs(split_tokens(tmp_path / "out",
                                                                                                  split)))
    from data import load_meta, open_split  # the reader takes the new fields in its stride

    assert load_meta(tmp_path / "out")["text_bytes"]["val"] == 18
    assert sum(len(s) for s in open_split(tmp_path / "out", "val")) == meta["splits"]["val"][0]["tokens"]


def test_num_proc_default_is_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert prepare_data.default_num_proc() == 3
    assert prepare_data.PrepareConfig().num_proc == 3 and prepare_data.parse_args([]).num_proc == 3
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS and Windows have none
    assert prepare_data.default_num_proc() == 64 == prepare_data.parse_args([]).num_proc
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert prepare_data.default_num_proc() == 1


# -------------------------------------------------------------------------------- OpenWebText, datasets>=4
def script_repo(tmp_path: Path) -> Path:
    """A dataset folder holding a loading script: the real load_dataset refuses it as it refuses the hub's
    Skylion007/openwebtext (datasets>=4), with its real message."""
    d = tmp_path / "openwebtext"
    d.mkdir()
    (d / "openwebtext.py").write_text("# a dataset loading script\n")
    return d


def test_openwebtext_script_refused_reads_the_parquet_conversion(tmp_path, monkeypatch, capsys):
    import datasets

    records = [json.loads(line)["text"] for line in shared_file("lambada_openai_test.jsonl").read_text().splitlines()]
    records = records[:40]
    real_load, calls, repo = datasets.load_dataset, [], script_repo(tmp_path)

    def fake_load(path, name=None, data_files=None, split=None, streaming=False, revision=None, data_dir=None, **kw):
        calls.append((path, name, data_dir, revision))
        if revision is None:
            return real_load(str(repo), split=split)  # raises datasets' own RuntimeError
        return datasets.Dataset.from_dict({"text": records})  # the conversion: here a partial one

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    run("--out-dir", tmp_path / "owt", "--val-docs", 4, "--num-proc", 1)
    assert calls == [("Skylion007/openwebtext", None, None, None),
                     ("Skylion007/openwebtext", None, None, prepare_data.PARQUET_REVISION)]
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("note: hf:Skylion007/openwebtext ships a dataset script")
    assert "(revision refs/convert/parquet)" in err[0]
    assert err[1] == ("warning: hf:Skylion007/openwebtext has 40 documents, not the published 8,013,769: the copy "
                      "read is partial (as the hub's parquet conversion of a large dataset can be), so the prepared "
                      "data will be smaller than the corpus")
    meta = json.loads((tmp_path / "owt" / "meta.json").read_text())
    assert meta["source"] == "hf:Skylion007/openwebtext revision refs/convert/parquet"
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in records))
    monkeypatch.setattr(datasets, "load_dataset", real_load)
    run("--files", tmp_path / "r.jsonl", "--out-dir", tmp_path / "local", "--val-docs", 4)
    assert shard_bytes(tmp_path / "owt") == shard_bytes(tmp_path / "local")
    assert np.array_equal(split_tokens(tmp_path / "owt", "val"), split_tokens(tmp_path / "local", "val"))


def test_openwebtext_unreadable_under_datasets_4_is_one_line(tmp_path, monkeypatch, capsys):
    import datasets

    real_load, repo = datasets.load_dataset, script_repo(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: real_load(str(repo), split="train"))
    with pytest.raises(SystemExit) as e:
        run_main(lambda: prepare_data.main(["--out-dir", str(tmp_path / "owt"), "--no-progress"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: could not read hf:Skylion007/openwebtext: it ships a dataset script")
    assert "RuntimeError: Dataset scripts are no longer supported, but found openwebtext.py" in err[0]
    assert 'pip install "datasets<4"' in err[0] and "--dataset fineweb-edu" in err[0]
    assert not (tmp_path / "owt").exists()
