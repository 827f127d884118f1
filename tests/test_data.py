"""data.py reader side: load_meta / open_split accept a good dataset and name the problem in a bad one.
Datasets are written by hand here (numpy + json, per docs/design.md "Formats"), and once by prepare_data.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, shared_file
from data import DataError, load_meta, open_split, split_tokens
from errors import UserError


def make_dataset(d: Path, shards: dict[str, list[list[int]]], **meta_overrides) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, arrays in shards.items():
        splits[split] = []
        for i, tokens in enumerate(arrays):
            name = f"{split}_{i:06d}.bin"
            np.asarray(tokens, dtype="<u2").tofile(d / name)
            splits[split].append({"file": name, "tokens": len(tokens), "docs": tokens.count(50256)})
    meta = {"format": 1, "tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256, "dtype": "uint16",
            "source": "test", "splits": splits, **meta_overrides}
    (d / "meta.json").write_text(json.dumps(meta))
    return d


GOOD = {"train": [[50256, 15496, 995, 50256, 40], [50256, 7, 8]], "val": [[50256, 1, 2, 3]]}


def test_good_dataset_memmaps_exact_tokens(tmp_path):
    d = make_dataset(tmp_path / "ds", GOOD)
    shards = open_split(d, "train", check_token_ids=True)
    assert [s.tolist() for s in shards] == GOOD["train"]
    assert all(isinstance(s, np.memmap) for s in shards)
    assert split_tokens(d, "train") == 8 and split_tokens(d, "val") == 4
    assert load_meta(d)["eot"] == 50256


def test_reads_what_prepare_data_writes(tmp_path):
    src = shared_file("tinyshakespeare.txt")
    r = subprocess.run([sys.executable, str(REPO / "prepare_data.py"), "--dataset", "shakespeare",
                        "--shakespeare-path", str(src), "--out-dir", str(tmp_path), "--shard-tokens", "100000",
                        "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    train, val = open_split(tmp_path, "train", True), open_split(tmp_path, "val", True)
    files = sorted(tmp_path.glob("train_*.bin"))
    assert [s.tolist() for s in train] == [np.fromfile(f, dtype="<u2").tolist() for f in files]
    assert sum(map(len, train)) + sum(map(len, val)) == split_tokens(tmp_path, "train") + split_tokens(tmp_path, "val")
    speeches = [t for t in src.read_text().split("\n\n") if t.strip()]  # the preset's documents
    assert sum(int((s == 50256).sum()) for s in train + val) == len(speeches)


def corrupt(d: Path, how: str) -> None:
    meta = json.loads((d / "meta.json").read_text())
    if how == "odd":
        with open(d / "train_000001.bin", "ab") as f:
            f.write(b"\x01")
    elif how == "missing_shard":
        (d / "train_000001.bin").unlink()
    elif how == "short_shard":
        (d / "train_000000.bin").write_bytes((d / "train_000000.bin").read_bytes()[:-2])
    elif how == "no_meta":
        (d / "meta.json").unlink()
    elif how == "bad_json":
        (d / "meta.json").write_text('{"format": 1, "splits": {')
    elif how == "newer":
        (d / "meta.json").write_text(json.dumps({**meta, "format": 2}))
    elif how == "no_splits":
        (d / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "splits"}))
    elif how == "bad_entry":
        meta["splits"]["train"][0] = {"file": "train_000000.bin"}
        (d / "meta.json").write_text(json.dumps(meta))
    elif how == "dtype":
        (d / "meta.json").write_text(json.dumps({**meta, "dtype": "uint32"}))


@pytest.mark.parametrize("how, words", [
    ("odd", ["train_000001.bin", "odd byte count"]),
    ("missing_shard", ["train_000001.bin", "missing"]),
    ("short_shard", ["train_000000.bin", "holds 4 tokens", "says 5"]),
    ("no_meta", ["meta.json is missing", "incomplete"]),
    ("bad_json", ["not valid JSON"]),
    ("newer", ["format 2 is newer"]),
    ("no_splits", ["no 'splits'"]),
    ("bad_entry", ["bad shard entry"]),
    ("dtype", ["uint32"]),
])
def test_corrupt_dataset_named_in_one_error(tmp_path, how, words):
    d = make_dataset(tmp_path / "ds", GOOD)
    open_split(d, "train")  # fine before
    corrupt(d, how)
    with pytest.raises(DataError) as e:
        open_split(d, "train")
    assert isinstance(e.value, UserError)
    for w in words:
        assert w in str(e.value)
    assert "\n" not in str(e.value)


def test_token_id_out_of_vocab(tmp_path):
    d = make_dataset(tmp_path / "ds", {"train": [[50256, 1, 2], [50256, 50257, 3]], "val": [[50256]]})
    open_split(d, "train")  # sizes are fine: only the id scan can see it
    with pytest.raises(DataError, match=r"train_000001.bin contains token id 50257 >= vocab_size 50257"):
        open_split(d, "train", check_token_ids=True)
    d2 = make_dataset(tmp_path / "ds2", {"train": [[50256, 65535]]})
    with pytest.raises(DataError, match="65535"):
        open_split(d2, "train", check_token_ids=True)


def test_missing_dir_and_empty_split(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_meta(tmp_path / "nope")
    d = make_dataset(tmp_path / "ds", {"train": GOOD["train"], "val": []})
    with pytest.raises(DataError, match="split 'val' has no shards"):
        open_split(d, "val")
