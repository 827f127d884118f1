"""Tiny datasets in the prepare_data.py format (docs/design.md "Formats"), written by the tests themselves so
they do not depend on prepare_data.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

EOT = 50256


def write_dataset(out: Path, splits: dict[str, list[np.ndarray]], vocab_size: int = 50257) -> Path:
    """Write each split's arrays as shards <split>_NNNNNN.bin (uint16) and meta.json last."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": 1, "tokenizer": "gpt2", "vocab_size": vocab_size, "eot": EOT, "dtype": "uint16",
            "source": "test", "splits": {}}
    for split, shards in splits.items():
        entries = []
        for i, toks in enumerate(shards):
            name = f"{split}_{i:06d}.bin"
            np.asarray(toks, dtype="<u2").tofile(out / name)
            entries.append({"file": name, "tokens": int(len(toks)), "docs": 1})
        meta["splits"][split] = entries
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def markov_tokens(n: int, vocab: int = 64, seed: int = 0) -> np.ndarray:
    """A learnable token stream: each token is one of 3 successors of the previous one (a fixed random
    table; `seed` only picks the path), so a small model's loss falls from log(vocab) towards log(3)."""
    succ = np.random.default_rng(12345).integers(0, vocab, size=(vocab, 3))
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.int64)
    out[0] = 0
    choices = rng.integers(0, 3, size=n)
    for i in range(1, n):
        out[i] = succ[out[i - 1], choices[i]]
    return out


def markov_dataset(out: Path, vocab: int = 64, train_tokens: int = 40_000, val_tokens: int = 8_000) -> Path:
    train = markov_tokens(train_tokens, vocab, seed=1)
    val = markov_tokens(val_tokens, vocab, seed=2)
    # two train shards of unequal length, to exercise rows that must not cross a shard boundary
    return write_dataset(out, {"train": [train[: train_tokens // 3], train[train_tokens // 3 :]], "val": [val]},
                         vocab_size=vocab)
