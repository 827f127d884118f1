"""Reading prepared datasets: data/<name>/meta.json + {train,val}_NNNNNN.bin (raw little-endian uint16 GPT-2
token ids, every document preceded by EOT). See DESIGN.md "Formats". prepare_data.py writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from errors import UserError

FORMAT_VERSION = 1
SPLITS = ("train", "val")


class DataError(UserError):
    """A prepared dataset that is missing, incomplete or corrupt."""


def load_meta(data_dir: str | Path) -> dict:
    """Read and check meta.json. A folder without it was never completed by prepare_data.py."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data dir {d} does not exist; run prepare_data.py first")
    meta_file = d / "meta.json"
    if not meta_file.is_file():
        raise DataError(f"{meta_file} is missing: the dataset is incomplete; re-run prepare_data.py")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{meta_file} is not valid JSON ({e}); re-run prepare_data.py --overwrite") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("splits"), dict):
        raise DataError(f"{meta_file} has no 'splits' table; re-run prepare_data.py --overwrite")
    if meta.get("format") != FORMAT_VERSION:
        raise DataError(f"{meta_file}: format {meta.get('format')!r} is not {FORMAT_VERSION}; "
                        "it was written by another version of prepare_data.py")
    if meta.get("dtype") != "uint16":
        raise DataError(f"{meta_file}: dtype {meta.get('dtype')!r} is not supported (expected uint16)")
    return meta


def open_split(data_dir: str | Path, split: str, check_token_ids: bool = False) -> list[np.memmap]:
    """Memory-map every shard of a split, checking each file against meta.json. check_token_ids also scans
    the tokens for ids >= vocab_size (reads the whole split)."""
    d = Path(data_dir)
    meta = load_meta(d)
    entries = meta["splits"].get(split)
    if not entries:
        raise DataError(f"{d / 'meta.json'}: split {split!r} has no shards")
    shards = []
    for entry in entries:
        f = d / entry["file"]
        if not f.is_file():
            raise DataError(f"shard {f} listed in meta.json is missing; re-run prepare_data.py --overwrite")
        size = f.stat().st_size
        if size % 2:
            raise DataError(f"shard {f} has an odd byte count ({size}): truncated or not uint16 tokens")
        if size // 2 != entry["tokens"]:
            raise DataError(f"shard {f} holds {size // 2} tokens but meta.json says {entry['tokens']}")
        shard = np.memmap(f, dtype=np.dtype("<u2"), mode="r")
        if check_token_ids:
            _check_ids(shard, f, meta.get("vocab_size", 50257))
        shards.append(shard)
    return shards


def _check_ids(shard: np.ndarray, f: Path, vocab_size: int, chunk: int = 1 << 24) -> None:
    for start in range(0, len(shard), chunk):
        top = int(shard[start : start + chunk].max(initial=0))
        if top >= vocab_size:
            raise DataError(f"shard {f} contains token id {top} >= vocab_size {vocab_size}: not GPT-2 tokens")


def split_tokens(data_dir: str | Path, split: str) -> int:
    """Total number of tokens in a split, from meta.json."""
    return sum(e["tokens"] for e in load_meta(data_dir)["splits"].get(split, []))
