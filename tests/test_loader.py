"""data.TokenLoader: rows cover an epoch exactly once, rank sharding, determinism, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _shards import write_dataset
from data import DataError, TokenLoader

T = 8


@pytest.fixture
def ds(tmp_path):
    # token value = its position within its shard + 1000*shard, so every row can be traced to its source
    a = np.arange(0, 165) % 50000
    b = 1000 + np.arange(0, 90)
    return write_dataset(tmp_path / "d", {"train": [a, b], "val": [b]})


def all_rows(ds) -> set[tuple]:
    shards = [np.arange(0, 165), 1000 + np.arange(0, 90)]
    return {tuple(s[i * T : i * T + T + 1]) for s in shards for i in range((len(s) - 1) // T)}


def epoch_rows(loader: TokenLoader, n_batches: int) -> list[tuple]:
    rows = []
    for _ in range(n_batches):
        x, y = loader.next_batch()
        assert x.dtype == torch.int64 and x.shape == y.shape == (loader.B, T)
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        rows += [tuple(x[i].tolist()) + (int(y[i, -1]),) for i in range(len(x))]
    return rows


def test_epoch_visits_every_row_once_without_crossing_shards(ds):
    expected = all_rows(ds)  # 20 rows in shard 0 ((165-1)//8), 11 in shard 1: 31 rows
    assert len(expected) == 31
    loader = TokenLoader(ds, "train", batch_size=1, seq_len=T, seed=3)
    rows = epoch_rows(loader, 31)
    assert len(set(rows)) == 31 and set(rows) == expected  # each row (T+1 contiguous tokens of one shard) once
    inputs = [t for r in rows for t in r[:-1]]
    assert len(inputs) == len(set(inputs))  # no token is an input twice within the epoch
    assert loader.state_dict()["epoch"] == 0
    nxt = epoch_rows(loader, 31)  # epoch 1: same rows, another order
    assert loader.state_dict()["epoch"] == 1 and set(nxt) == expected and nxt != rows


def test_ranks_split_the_global_batch(ds):
    one = TokenLoader(ds, "train", batch_size=4, seq_len=T, seed=5)
    r0 = TokenLoader(ds, "train", batch_size=2, seq_len=T, rank=0, world_size=2, seed=5)
    r1 = TokenLoader(ds, "train", batch_size=2, seq_len=T, rank=1, world_size=2, seed=5)
    for _ in range(12):  # crosses an epoch boundary (7 batches of 4 per epoch)
        x, y = one.next_batch()
        (x0, y0), (x1, y1) = r0.next_batch(), r1.next_batch()
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
        assert not torch.equal(x0, x1)


def test_seeded_and_resumable(ds):
    a = TokenLoader(ds, "train", batch_size=3, seq_len=T, seed=1)
    b = TokenLoader(ds, "train", batch_size=3, seq_len=T, seed=1)
    c = TokenLoader(ds, "train", batch_size=3, seq_len=T, seed=2)
    xa = [a.next_batch()[0] for _ in range(7)]
    assert all(torch.equal(u, b.next_batch()[0]) for u in xa)
    assert not all(torch.equal(u, c.next_batch()[0]) for u in xa)
    state = a.state_dict()
    cont = [a.next_batch()[0] for _ in range(15)]
    resumed = TokenLoader(ds, "train", batch_size=3, seq_len=T, seed=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(u, resumed.next_batch()[0]) for u in cont)


def test_val_order_is_file_order(ds):
    v = TokenLoader(ds, "val", batch_size=2, seq_len=T, shuffle=False)
    x, _ = v.next_batch()
    assert x[0, 0] == 1000 and x[1, 0] == 1000 + T


def test_errors(ds, tmp_path):
    with pytest.raises(DataError, match="fewer than one batch"):
        TokenLoader(ds, "val", batch_size=64, seq_len=T)
    with pytest.raises(DataError, match="does not exist"):
        TokenLoader(tmp_path / "nope", "train", batch_size=1, seq_len=T)
    state = TokenLoader(ds, "train", batch_size=1, seq_len=T, seed=1).state_dict()
    with pytest.raises(DataError, match="same data_dir, seq_len, seed"):
        TokenLoader(ds, "train", batch_size=1, seq_len=T, seed=2).load_state_dict(state)
