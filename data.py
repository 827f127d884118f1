"""Reading prepared datasets: data/<name>/meta.json + {train,val}_NNNNNN.bin (raw little-endian uint16 GPT-2
token ids, every document preceded by EOT). See docs/design.md "Formats". prepare_data.py writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

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
    fmt = meta.get("format")
    if isinstance(fmt, int) and fmt > FORMAT_VERSION:
        raise DataError(f"{meta_file}: format {fmt} is newer than this code reads ({FORMAT_VERSION}); "
                        "update the code or re-run this version's prepare_data.py --overwrite")
    if fmt != FORMAT_VERSION:
        raise DataError(f"{meta_file}: format {fmt!r} is not {FORMAT_VERSION}; "
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
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
                or not isinstance(entry.get("tokens"), int):
            raise DataError(f"{d / 'meta.json'}: bad shard entry {entry!r} in split {split!r} (needs file and "
                            "tokens); re-run prepare_data.py --overwrite")
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


def bad_id_error(f: str | Path, top: int, vocab_size: int) -> DataError:
    return DataError(f"shard {f} contains token id {top} >= vocab_size {vocab_size} of meta.json: corrupt or "
                     "another tokenizer's tokens; re-run prepare_data.py --overwrite")


# ----------------------------------------------------------------------------------------------------
# TokenLoader: (x, y) batches for training, sharded across DDP ranks, resumable


class TokenLoader:
    """Yields (x, y) int64 batches of shape (B, T) for one DDP rank.

    Sampling scheme (chosen for exact resume and no repetition): every shard of the split is cut into
    non-overlapping rows of T tokens (row i covers tokens [i*T, i*T + T), its targets are the same span
    shifted by one, so the row needs T + 1 tokens; a shard's tail shorter than that is dropped). Rows never
    cross a shard boundary. Each epoch visits every row exactly once, in an order given by a permutation
    seeded by (seed, epoch), so within an epoch no token is an input twice; `shuffle=False` keeps file order
    (used for the validation split, so every evaluation sees the same rows).

    All ranks walk the same global row stream: one global micro-batch is the next B * world_size rows, of
    which rank r takes rows [r*B, (r+1)*B). A training step with grad_accum micro-steps therefore consumes
    the same set of rows for any (world_size, grad_accum) with the same product, so one process with
    grad_accum=4 sees exactly the data of two processes with grad_accum=2.

    The state is the global position (epoch, row) and is the same on every rank: saving rank 0's copy is
    enough, and a run can resume with a different world size.
    """

    rows = "packed"  # TrainConfig.rows; seed_rows.py has the other row formats

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.shards = open_split(data_dir, split)
        self.vocab_size = int(load_meta(data_dir).get("vocab_size", 50257))
        self.B, self.T, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        rows = np.array([max(0, (len(s) - 1) // seq_len) for s in self.shards], dtype=np.int64)
        self.row_start = np.concatenate(([0], np.cumsum(rows)))  # global row index of each shard's row 0
        self._start(int(self.row_start[-1]), f"rows of {seq_len + 1} tokens", f"{data_dir} split {split!r}")

    def _start(self, n_rows: int, what: str, where: str) -> None:
        """Set the number of rows of an epoch and go to its start (also for seed_rows.py's row formats)."""
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} not in [0, {self.world_size})")
        self.n_rows = n_rows
        if n_rows < self.B * self.world_size:
            raise DataError(f"{where} has {n_rows} {what}, fewer than one batch needs ({self.B} x "
                            f"{self.world_size} ranks); use a smaller micro_batch / seq_len or more data")
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_rows, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)

    def _row(self, g: int) -> np.ndarray:
        s = int(np.searchsorted(self.row_start, g, side="right")) - 1
        start = (g - int(self.row_start[s])) * self.T
        return self.shards[s][start : start + self.T + 1]

    def _next_rows(self) -> np.ndarray:
        """The next global micro-batch: B * world_size row indices, of which rank r reads [r*B, (r+1)*B)."""
        need = self.B * self.world_size
        if self.pos + need > self.n_rows:  # epoch ends: drop the remainder so every rank stays in step
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        rows = self._order[self.pos : self.pos + need]
        self.pos += need
        return rows

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows_at(self._next_rows()[self.rank * self.B : (self.rank + 1) * self.B])

    def rows_at(self, mine: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the given global row indices, file order (row g covers tokens [g*T, g*T + T] of the split,
        whatever the shuffle): next_batch's reader, and the val split's by index."""
        buf = torch.from_numpy(np.stack([self._row(int(g)) for g in mine]).astype(np.int64))
        if int(buf.max()) >= self.vocab_size:  # per batch: cheap, unlike scanning a 10B-token split up front
            g = int(mine[int(buf.amax(dim=1).argmax())])
            f = self.shards[int(np.searchsorted(self.row_start, g, side="right")) - 1].filename
            raise bad_id_error(f, int(buf.max()), self.vocab_size)
        return buf[:, :-1], buf[:, 1:]

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n_rows": self.n_rows, "seq_len": self.T}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rows", "packed") != self.rows:  # TokenLoader's own state has no "rows": packed
            raise DataError(f"the checkpoint's data position is for rows={state.get('rows', 'packed')!r}, this "
                            f"config reads rows={self.rows!r}: resume with the same rows setting")
        if state["n_rows"] != self.n_rows or state["seq_len"] != self.T or state["seed"] != self.seed:
            raise DataError(f"the checkpoint's data position (rows={state['n_rows']}, seq_len={state['seq_len']}, "
                            f"seed={state['seed']}) does not fit this dataset/config (rows={self.n_rows}, "
                            f"seq_len={self.T}, seed={self.seed}): resume with the same data_dir, seq_len, seed")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._epoch_order(self.epoch)
