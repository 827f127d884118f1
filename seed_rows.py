"""The seed project's training rows (TrainConfig rows="seed512") and packed rows of the same tokens
(rows="packed_filtered"); docs/seed_pipeline.md.

The seed (the project this codebase replaced) tokenized every document on its own with Hugging Face's GPT-2
tokenizer, `tokenizer(text, truncation=True, max_length=512, return_overflowing_tokens=True)`: a document became
consecutive 512-token windows (no stride; the last one shorter, the later ones starting mid-document with no
context), windows with fewer than 256 tokens were dropped (`filter(sum(attention_mask) >= 256)`), and each batch
was padded to its longest row with EOS (GPT-2 has no pad token). Its tokenizer adds no special tokens, so a row
is the document's text tokens only. The prepared shards hold the same documents, each preceded by EOT
(docs/design.md "Formats"), so the rows are rebuilt from the shards: no second tokenization.

SeedRowLoader yields (x, y) of shape (B, L - 1) for the longest window L of the micro-batch: x is the padded rows
without their last position, y the rows shifted by one (Hugging Face's GPT2LMHeadModel shifts the labels inside
the model; a row of n real tokens has n - 1 targets). Targets that are padding are -1 (model.py's ignore_index,
as DataCollatorForLanguageModeling(mlm=False) sets them to -100), unless loss_on_padding. The model's attention
is causal, so the logits of a row's real tokens never see the padding after them.

PackedFilteredLoader yields TokenLoader's packed rows of the tokens seed512 keeps (each document, with its EOT,
cut back to its kept windows; a document without one is left out): packed vs packed_filtered is the filter
alone, packed_filtered vs seed512 the row format alone, on the same tokens.

Both are TokenLoaders: the same seeded epoch order, DDP rank split (rank r takes rows [r*B, (r+1)*B) of each
global micro-batch) and resumable state.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from data import TokenLoader, bad_id_error, load_meta, open_split
from errors import UserError

if TYPE_CHECKING:
    from train_config import TrainConfig

SEED_MAX_LENGTH = 512  # the seed's max_length: its rows' window


def seed_windows(lengths: np.ndarray, max_length: int, min_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The windows Hugging Face's return_overflowing_tokens (stride 0) cuts documents of `lengths` tokens into,
    those with fewer than min_tokens tokens dropped: (document index, offset in the document, length) of each, in
    document order. An empty document gives one empty window, as the tokenizer gives one empty row."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n_win = np.maximum(1, -(-lengths // max_length))
    doc = np.repeat(np.arange(len(lengths)), n_win)
    offset = (np.arange(len(doc)) - np.repeat(np.cumsum(n_win) - n_win, n_win)) * max_length
    length = np.minimum(max_length, lengths[doc] - offset)
    keep = length >= min_tokens
    return doc[keep], offset[keep], length[keep]


class SplitDocuments:
    """The documents of a split: the tokens between EOTs, in positions of the split's shards laid end to end
    (a document may run on into the next shard). `eot[i]` is the position of document i's EOT (-1 for tokens
    before the split's first EOT), `start[i]`, `length[i]` its tokens after it."""

    def __init__(self, shards: list[np.ndarray], eot_id: int, chunk: int = 1 << 24):
        self.shards, self.eot_id = shards, eot_id
        self.offset = np.concatenate(([0], np.cumsum([len(s) for s in shards]))).astype(np.int64)
        found = [np.flatnonzero(s[i : i + chunk] == eot_id) + (off + i)  # chunked: bounded memory per shard
                 for s, off in zip(shards, self.offset) for i in range(0, len(s), chunk)]
        eot = np.concatenate([np.zeros(0, np.int64), *found]).astype(np.int64)
        total = int(self.offset[-1])
        if total and (not len(eot) or eot[0] != 0):
            eot = np.concatenate(([-1], eot))
        self.eot, self.start = eot, eot + 1
        self.length = np.append(eot[1:], total) - self.start

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the split, across shard boundaries."""
        s = int(np.searchsorted(self.offset, start, side="right")) - 1
        pieces = []
        while n > 0:
            lo = start - int(self.offset[s])
            pieces.append(self.shards[s][lo : lo + n])
            start, n, s = start + len(pieces[-1]), n - len(pieces[-1]), s + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def shard_of(self, pos: int) -> np.ndarray:
        return self.shards[int(np.searchsorted(self.offset, pos, side="right")) - 1]


def _open(data_dir: str | Path, split: str, min_tokens: int) -> tuple[list[np.ndarray], int, SplitDocuments]:
    """The split's shards, meta.json's vocab_size and the split's documents (separated by meta.json's eot)."""
    if not 0 <= min_tokens <= SEED_MAX_LENGTH:
        raise UserError(f"seed_min_tokens={min_tokens} must be in [0, {SEED_MAX_LENGTH}]")
    meta = load_meta(data_dir)
    shards = open_split(data_dir, split)
    return shards, int(meta.get("vocab_size", 50257)), SplitDocuments(shards, int(meta.get("eot", 50256)))


class SeedRowLoader(TokenLoader):
    """The seed's rows: every kept window of every document is a row; an epoch visits each once (seeded order,
    as TokenLoader). loss_tokens counts the targets the loss has seen so far over all ranks (it is in the
    state: a resumed run continues the count)."""

    rows = "seed512"

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, max_length: int = SEED_MAX_LENGTH,
                 min_tokens: int = 256, loss_on_padding: bool = False, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        self.shards, self.vocab_size, self.docs = _open(data_dir, split, min_tokens)
        self.B, self.T, self.rank, self.world_size = batch_size, max_length, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.min_tokens, self.loss_on_padding, self.loss_tokens = min_tokens, loss_on_padding, 0
        self.pad_id = self.docs.eot_id  # GPT-2 has no pad token: the seed padded with EOS, which is EOT
        doc, offset, self.win_len = seed_windows(self.docs.length, max_length, min_tokens)
        self.win_start = self.docs.start[doc] + offset
        self._start(len(doc), f"windows of >= {min_tokens} tokens (seed_min_tokens)", f"{data_dir} split {split!r}")

    def _row(self, g: int) -> np.ndarray:
        return self.docs.read(int(self.win_start[g]), int(self.win_len[g]))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._next_rows()
        lens = self.win_len[rows].reshape(self.world_size, self.B)  # every rank's rows: a global count, no comms
        if self.loss_on_padding:  # each rank pads to its own longest row; every position but the last is a target
            self.loss_tokens += int(np.maximum(lens.max(axis=1) - 1, 0).sum()) * self.B
        else:
            self.loss_tokens += int(np.maximum(lens - 1, 0).sum())
        mine, n = rows[self.rank * self.B : (self.rank + 1) * self.B], lens[self.rank]
        buf = np.full((self.B, int(n.max())), self.pad_id, dtype=np.int64)
        for i, g in enumerate(mine):
            buf[i, : n[i]] = self._row(int(g))
        if int(buf.max(initial=0)) >= self.vocab_size:
            i = int(buf.max(axis=1).argmax())
            raise bad_id_error(self.docs.shard_of(int(self.win_start[mine[i]])).filename, int(buf.max()),
                               self.vocab_size)
        x, y = torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())
        if not self.loss_on_padding:  # position j predicts token j + 1: padding from j = n - 1 on
            y[torch.arange(y.size(1))[None] >= torch.from_numpy(n - 1)[:, None]] = -1
        return x, y

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rows": self.rows, "min_tokens": self.min_tokens,
                "loss_on_padding": self.loss_on_padding, "loss_tokens": self.loss_tokens}

    def load_state_dict(self, state: dict) -> None:
        _check_same(state, {"min_tokens": self.min_tokens, "loss_on_padding": self.loss_on_padding}, self.rows)
        super().load_state_dict(state)
        self.loss_tokens = int(state["loss_tokens"])


class PackedFilteredLoader(TokenLoader):
    """TokenLoader's packed rows of seq_len + 1 tokens, cut from the tokens SeedRowLoader keeps: per document
    its EOT and its kept windows (a prefix of it: only the last window can be short), laid end to end within
    each shard. With min_tokens=0 every token is kept and the rows are TokenLoader's."""

    rows = "packed_filtered"

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seq_len: int, min_tokens: int = 256,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.shards, self.vocab_size, docs = _open(data_dir, split, min_tokens)
        self.B, self.T, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.seed, self.shuffle, self.min_tokens = seed, shuffle, min_tokens
        doc, _, length = seed_windows(docs.length, SEED_MAX_LENGTH, min_tokens)
        n_docs = len(docs.length)
        kept_doc = np.bincount(doc, minlength=n_docs) > 0
        kept_len = np.bincount(doc, weights=length, minlength=n_docs).astype(np.int64)
        lo = np.where(docs.eot >= 0, docs.eot, docs.start)[kept_doc]  # from the EOT on
        hi = (docs.start + kept_len)[kept_doc]
        # per shard: the kept spans clipped to it, as (start in the shard, start in the shard's kept stream)
        self.spans: list[tuple[np.ndarray, np.ndarray]] = []
        rows = []
        for s in range(len(self.shards)):
            a, b = docs.offset[s], docs.offset[s + 1]
            cl, ch = np.clip(lo, a, b), np.clip(hi, a, b)
            nonempty = ch > cl
            cl, ch = cl[nonempty] - a, ch[nonempty] - a
            stream = np.concatenate(([0], np.cumsum(ch - cl)))
            self.spans.append((cl, stream))
            rows.append(max(0, (int(stream[-1]) - 1) // seq_len))
        self.row_start = np.concatenate(([0], np.cumsum(rows))).astype(np.int64)
        self._start(int(self.row_start[-1]), f"rows of {seq_len + 1} tokens of documents kept by "
                    f"seed_min_tokens={min_tokens}", f"{data_dir} split {split!r}")

    def _row(self, g: int) -> np.ndarray:
        s = int(np.searchsorted(self.row_start, g, side="right")) - 1
        span_start, stream = self.spans[s]
        pos = (g - int(self.row_start[s])) * self.T + np.arange(self.T + 1)  # in the shard's kept stream
        span = np.searchsorted(stream, pos, side="right") - 1
        return self.shards[s][span_start[span] + pos - stream[span]]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rows": self.rows, "min_tokens": self.min_tokens}

    def load_state_dict(self, state: dict) -> None:
        _check_same(state, {"min_tokens": self.min_tokens}, self.rows)
        super().load_state_dict(state)


def _check_same(state: dict, mine: dict, rows: str) -> None:
    if state.get("rows") != rows:
        return  # TokenLoader.load_state_dict names the rows mismatch
    saved = {k: state.get(k) for k in mine}
    if saved != mine:
        raise UserError(f"the checkpoint's data position was made with {saved}, this config asks for {mine}: "
                        "resume with the same seed_* settings")


def train_loader(cfg: TrainConfig, rank: int, world_size: int) -> TokenLoader:
    """The training loader of a TrainConfig's rows setting."""
    if cfg.rows == "seed512":
        return SeedRowLoader(cfg.data_dir, "train", cfg.micro_batch, cfg.seq_len, cfg.seed_min_tokens,
                             cfg.seed_loss_on_padding, rank, world_size, seed=cfg.seed)
    if cfg.rows == "packed_filtered":
        return PackedFilteredLoader(cfg.data_dir, "train", cfg.micro_batch, cfg.seq_len, cfg.seed_min_tokens,
                                    rank, world_size, seed=cfg.seed)
    return TokenLoader(cfg.data_dir, "train", cfg.micro_batch, cfg.seq_len, rank, world_size, seed=cfg.seed)


def row_stats(data_dir: str | Path, min_tokens: int = 256, micro_batch: int = 16, batches: int = 200) -> None:
    """Print what the row formats make of a prepared train split: documents, windows kept by the filter, loss
    targets per epoch, and the padding of seed512 micro-batches (first `batches` of seed 1337)."""
    docs = SplitDocuments(open_split(data_dir, "train"), int(load_meta(data_dir).get("eot", 50256)))
    n_tok = int(docs.length.sum())
    print(f"train: {len(docs.length):,} documents, {n_tok:,} tokens besides their EOTs, median document "
          f"{int(np.median(docs.length)):,} tokens")
    for m in sorted({min_tokens, 0}, reverse=True):
        doc, _, length = seed_windows(docs.length, SEED_MAX_LENGTH, m)
        n_docs = len(np.unique(doc))
        print(f"seed512 seed_min_tokens={m}: {len(length):,} rows ({np.mean(length == SEED_MAX_LENGTH):.1%} full), "
              f"{int(length.sum()):,} tokens ({length.sum() / n_tok:.1%}) of {n_docs:,} documents "
              f"({n_docs / len(docs.length):.1%}); {int(np.maximum(length - 1, 0).sum()):,} loss targets per epoch")
    packed = TokenLoader(data_dir, "train", micro_batch, SEED_MAX_LENGTH)
    filtered = PackedFilteredLoader(data_dir, "train", micro_batch, SEED_MAX_LENGTH, min_tokens)
    print(f"seq_len={SEED_MAX_LENGTH}: packed {packed.n_rows * SEED_MAX_LENGTH:,} loss targets per epoch, "
          f"packed_filtered(seed_min_tokens={min_tokens}) {filtered.n_rows * SEED_MAX_LENGTH:,}")
    loader = SeedRowLoader(data_dir, "train", micro_batch, min_tokens=min_tokens, seed=1337)
    width = [loader.next_batch()[0].size(1) + 1 for _ in range(batches)]
    print(f"seed512 micro_batch={micro_batch}, {batches} batches: padded to {np.mean(width):.1f} tokens on average; "
          f"{loader.loss_tokens / (batches * micro_batch * (SEED_MAX_LENGTH - 1)):.1%} of 511 targets per row are real")


if __name__ == "__main__":  # python seed_rows.py data/wiki [seed_min_tokens]
    import sys

    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: python seed_rows.py DATA_DIR [SEED_MIN_TOKENS]\n\nThe seed512 rows' statistics of a prepared "
              "dataset.", file=sys.stdout if len(sys.argv) > 1 else sys.stderr)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    row_stats(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
