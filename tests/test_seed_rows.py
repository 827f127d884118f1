"""seed_rows.py: the seed project's rows (rows="seed512") and packed rows of the tokens they keep
(rows="packed_filtered"). References nobody here wrote: the seed's recipe run through Hugging Face's tokenizer,
DataCollatorForLanguageModeling and GPT2LMHeadModel on real documents; TokenLoader's packed rows; uninterrupted
and single-process train.py runs."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DataCollatorForLanguageModeling, GPT2LMHeadModel, GPT2TokenizerFast

import prepare_data
import tokenizer
from _shards import markov_tokens, write_dataset
from conftest import SAMPLE_DATA
from data import DataError, TokenLoader
from errors import UserError
from hf import export_hf_gpt2
from model import GPT, GPTConfig
from seed_rows import PackedFilteredLoader, SeedRowLoader, seed_windows
from test_train import args, assert_identical, ckpt, interrupted_run, metrics, run
from train_config import ConfigError, TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WIKI = SAMPLE_DATA / "corpus_wikipedia_en" / "AA"  # 22 real articles of 7 to 900 tokens: short ones, long ones


def hf_tokenizer() -> GPT2TokenizerFast:
    d = tokenizer.bpe_files_dir()
    tok = GPT2TokenizerFast(vocab=str(d / "encoder.json"), merges=str(d / "vocab.bpe"))
    assert tok.encode("Hello world") == [15496, 995]  # transformers 5 builds an empty tokenizer from wrong args
    tok.pad_token = tok.eos_token  # the seed's: GPT-2 has no pad token
    return tok


def seed_recipe(texts: list[str], min_tokens: int) -> tuple[list[list[int]], list[int]]:
    """The seed's pipeline through Hugging Face: tokenize with overflow and padding, keep rows with at least
    min_tokens real tokens. Returns each kept row's real tokens and the document it came from."""
    tok = hf_tokenizer()
    enc = tok(texts, truncation=True, max_length=512, return_overflowing_tokens=True, padding="longest")
    rows, docs = [], []
    for ids, mask, doc in zip(enc["input_ids"], enc["attention_mask"], enc["overflow_to_sample_mapping"]):
        n = sum(mask)
        assert mask == [1] * n + [0] * (len(mask) - n) and set(ids[n:]) <= {50256}  # right-padded with EOS
        if n >= min_tokens:
            rows.append(ids[:n])
            docs.append(doc)
    return rows, docs


@pytest.fixture(scope="module")
def wiki(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """The Wikipedia sample prepared twice: in 1,000-token shards (documents run across shard boundaries) and
    in one shard; and the train documents' texts as prepare_data.py read them (the first document is val)."""
    base = tmp_path_factory.mktemp("wiki")
    for name, shard in (("multi", 1000), ("one", 10**8)):
        prepare_data.main(["--files", str(WIKI), "--out-dir", str(base / name), "--val-docs", "1", "--num-proc",
                           "1", "--shard-tokens", str(shard), "--no-progress"])
    texts = [t for p in sorted(WIKI.iterdir()) for t in prepare_data.wikiextractor_documents(p, True)][1:]
    assert len(json.loads((base / "multi" / "meta.json").read_text())["splits"]["train"]) > 5
    return base / "multi", base / "one", texts


@pytest.mark.parametrize("min_tokens", [256, 0])
def test_rows_are_the_seed_recipes(wiki, min_tokens):
    """Every kept window, in document order, equals the Hugging Face recipe's row: same windows, same drops."""
    multi, _, texts = wiki
    ref, ref_docs = seed_recipe(texts, min_tokens)
    loader = SeedRowLoader(multi, "train", 1, min_tokens=min_tokens, shuffle=False)
    assert [loader._row(g).tolist() for g in range(loader.n_rows)] == ref
    if min_tokens:  # the filter dropped short documents and the short tails of long ones
        assert len(set(ref_docs)) < len(texts) and any(len(r) == 512 for r in ref) and len(ref) > 5
        assert len(ref) < len(seed_recipe(texts, 0)[0])


def test_batches_are_the_collators(wiki):
    """A micro-batch is DataCollatorForLanguageModeling(mlm=False)'s batch of the same rows, with HF's label shift
    done outside the model: x = input_ids[:, :-1], y = labels[:, 1:] (-100 -> -1); loss_on_padding keeps the pads."""
    multi, _, texts = wiki
    ref, _ = seed_recipe(texts, 256)
    collate = DataCollatorForLanguageModeling(hf_tokenizer(), mlm=False)
    for loss_on_padding in (False, True):
        loader = SeedRowLoader(multi, "train", 4, loss_on_padding=loss_on_padding, shuffle=False)
        for b in range(len(ref) // 4):
            hf = collate([{"input_ids": r} for r in ref[4 * b : 4 * b + 4]])
            x, y = loader.next_batch()
            assert torch.equal(x, hf["input_ids"][:, :-1])
            want = hf["input_ids"] if loss_on_padding else hf["labels"].masked_fill(hf["labels"] == -100, -1)
            assert torch.equal(y, want[:, 1:])
        assert x.dtype == y.dtype == torch.int64


@pytest.mark.e2e
@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_loss_and_logits_ignore_the_padding(wiki, tmp_path, attention):
    """Loss = GPT2LMHeadModel's with the attention mask and -100 labels (its mean over real targets), and the
    logits of real tokens are HF's and those of the row run alone, unpadded."""
    multi, _, _ = wiki
    torch.manual_seed(0)
    ours = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=512, attention=attention)).eval()
    hf = GPT2LMHeadModel.from_pretrained(export_hf_gpt2(ours, tmp_path)).eval()
    loader = SeedRowLoader(multi, "train", 2, shuffle=False)  # 2 rows: 50257-wide logits are large
    x, y = loader.next_batch()
    n = (y != -1).sum(1) + 1  # real tokens per row
    assert len(set(n.tolist())) > 1  # rows of different lengths: real padding
    last = y[:, -1:].masked_fill(y[:, -1:] == -1, 50256)
    full = torch.cat([x, last], 1)  # the padded rows: HF takes the whole row and shifts the labels itself
    real = torch.arange(full.size(1))[None] < n[:, None]
    labels = full.masked_fill(~real, -100)
    with torch.no_grad():
        ref = hf(full, attention_mask=real.long(), labels=labels)
        logits, loss = ours(x, y)
    torch.testing.assert_close(loss, ref.loss, rtol=0, atol=1e-5)
    for i, k in enumerate(n.tolist()):
        torch.testing.assert_close(logits[i, : k - 1], ref.logits[i, : k - 1], rtol=0, atol=1e-4)
        with torch.no_grad():
            alone, _ = ours(x[i : i + 1, : k - 1])
        torch.testing.assert_close(logits[i, : k - 1], alone[0], rtol=0, atol=1e-5)


def test_loss_tokens_count_the_real_targets(wiki):
    multi, _, _ = wiki
    for loss_on_padding in (False, True):
        loader = SeedRowLoader(multi, "train", 2, loss_on_padding=loss_on_padding, seed=3)
        seen = positions = 0
        for _ in range(9):  # past the end of the 6-batch epoch
            _, y = loader.next_batch()
            seen, positions = seen + int((y != -1).sum()), positions + y.numel()
        assert loader.loss_tokens == seen and loader.epoch == 1
        assert seen == positions if loss_on_padding else seen < positions  # with it, every position is a target


def test_ranks_split_the_global_batch(wiki):
    """Rank r of 2 reads, in each global micro-batch, the rows one process reads as its micro-batch 2k + r; the
    count of loss tokens is global on every rank."""
    multi, _, _ = wiki
    one = SeedRowLoader(multi, "train", 2, seed=5)
    ranks = [SeedRowLoader(multi, "train", 2, rank=r, world_size=2, seed=5) for r in range(2)]
    for _ in range(3):  # the epoch holds 12 windows: 3 global micro-batches of 4
        for r in ranks:
            x, y = r.next_batch()
            x1, y1 = one.next_batch()
            assert torch.equal(x, x1) and torch.equal(y, y1)
        assert ranks[0].loss_tokens == ranks[1].loss_tokens == one.loss_tokens


def test_seeded_and_resumable(wiki):
    multi, _, _ = wiki
    a = SeedRowLoader(multi, "train", 2, seed=1)
    firsts = [a.next_batch() for _ in range(4)]
    b = SeedRowLoader(multi, "train", 2, seed=1)
    b.load_state_dict(a.state_dict())
    for _ in range(7):  # through the epoch boundary
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.state_dict() == b.state_dict() and a.epoch == 1
    c = SeedRowLoader(multi, "train", 2, seed=1)
    assert all(torch.equal(c.next_batch()[0], x) for x, _ in firsts)  # same seed, same order
    orders = [SeedRowLoader(multi, "train", 2, seed=s)._order.tolist() for s in (1, 2)]
    assert orders[0] != orders[1] and sorted(orders[0]) == list(range(a.n_rows))
    assert a._epoch_order(0).tolist() != a._epoch_order(1).tolist()
    with pytest.raises(UserError, match="seed_"):
        SeedRowLoader(multi, "train", 2, seed=1, min_tokens=100).load_state_dict(a.state_dict())
    with pytest.raises(DataError, match="rows='seed512'"):
        TokenLoader(multi, "train", 2, 512, seed=1).load_state_dict(a.state_dict())


def test_packed_filtered_without_filter_is_packed(wiki):
    """seed_min_tokens=0 keeps every token: the batches are TokenLoader's, bit for bit, with shards and shuffling."""
    multi, _, _ = wiki
    for world, rank in ((1, 0), (2, 1)):
        a = TokenLoader(multi, "train", 2, 64, rank, world, seed=4)
        b = PackedFilteredLoader(multi, "train", 2, 64, 0, rank, world, seed=4)
        assert a.n_rows == b.n_rows
        for _ in range(2 * a.n_rows // (2 * world) + 1):
            (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_packed_filtered_rows_hold_the_seed_rows_tokens(wiki):
    """With the filter: packed rows cut from the documents' kept windows (the HF recipe's rows, each document's
    with its EOT first), laid end to end."""
    _, one, texts = wiki
    ref, docs = seed_recipe(texts, 256)
    stream = []
    for i, r in enumerate(ref):
        stream += ([50256] if i == 0 or docs[i] != docs[i - 1] else []) + r
    T = 100
    loader = PackedFilteredLoader(one, "train", 1, T, 256, shuffle=False)
    assert loader.n_rows == (len(stream) - 1) // T
    for i in range(loader.n_rows):
        x, y = loader.next_batch()
        assert x[0].tolist() == stream[i * T : i * T + T] and y[0].tolist() == stream[i * T + 1 : i * T + T + 1]


def test_seed_windows_cut_like_overflow():
    doc, off, length = seed_windows(np.array([0, 5, 12, 8]), 4, 0)
    assert doc.tolist() == [0, 1, 1, 2, 2, 2, 3, 3]
    assert off.tolist() == [0, 0, 4, 0, 4, 8, 0, 4] and length.tolist() == [0, 4, 1, 4, 4, 4, 4, 4]
    doc, off, length = seed_windows(np.array([0, 5, 12, 8]), 4, 4)  # a window of exactly min_tokens stays
    assert doc.tolist() == [1, 2, 2, 2, 3, 3] and length.tolist() == [4, 4, 4, 4, 4, 4]


def test_config_checks():
    base = dict(max_steps=1, seq_len=512)
    assert TrainConfig(max_steps=1).rows == "packed"
    for bad, match in ((dict(rows="seed"), "choose packed"), (dict(rows="seed512", seq_len=256), "seq_len=512"),
                       (dict(seed_min_tokens=513), r"\[0, 512\]"), (dict(seed_loss_on_padding=True), "needs rows")):
        with pytest.raises(ConfigError, match=match):
            TrainConfig(**{**base, **bad})
    TrainConfig(**base, rows="seed512", seed_min_tokens=0, seed_loss_on_padding=True)
    TrainConfig(**base, rows="packed_filtered")


# ----------------------------------------------------------------------------------------------------
# train.py with rows=seed512: exact resume, DDP = one process, loss_tokens logged

EOT, VOCAB = 63, 64  # a 64-token vocabulary whose last id separates documents, so a tiny model trains fast
SEED_TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": VOCAB, "block_size": 512, "dropout": 0.1}


@pytest.fixture(scope="module")
def docs_data(tmp_path_factory) -> Path:
    """Markov documents of 30 to 1,400 tokens, each preceded by EOT, in two shards; meta.json names the EOT."""
    rng = np.random.default_rng(0)
    stream = np.concatenate([np.concatenate(([EOT], markov_tokens(int(n), vocab=EOT, seed=i)))
                             for i, n in enumerate(rng.integers(30, 1400, size=60))])
    out = write_dataset(tmp_path_factory.mktemp("docs") / "data", {"train": [stream[:20000], stream[20000:]],
                                                                   "val": [stream[:5000]]}, vocab_size=VOCAB)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "eot": EOT}))
    return out


SEED_RUN = dict(rows="seed512", seq_len=512, micro_batch=2, total_batch_tokens=4096, max_steps=8, eval_interval=4,
                eval_tokens=1024, model_overrides=SEED_TINY)


def loss_tokens(out: Path) -> list[int]:
    return [json.loads(r)["loss_tokens"] for r in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]


@pytest.mark.e2e
def test_seed_rows_resume_after_sigterm_is_bit_identical(docs_data, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run(args(docs_data, ref, **SEED_RUN))
    p = interrupted_run(args(docs_data, cut, **SEED_RUN), "step 1/8", signal.SIGTERM)
    assert p.returncode == 0
    assert 2 <= ckpt(cut)["step"] < 8 and ckpt(cut)["loader"]["rows"] == "seed512"
    run(args(docs_data, cut, init_from="resume", **SEED_RUN))
    assert_identical(ref, cut)
    counts = loss_tokens(ref)
    assert counts == loss_tokens(cut) and counts[-1] == ckpt(ref)["loader"]["loss_tokens"]
    loader, expected, seen = SeedRowLoader(docs_data, "train", 2, seed=7), [], 0  # the run's seed (args)
    for _ in range(8):
        for _ in range(4):  # grad_accum: 4096 / (2 x 512)
            seen += int((loader.next_batch()[1] != -1).sum())
        expected.append(seen)
    assert counts == expected and counts[-1] < 8 * 8 * 511  # the padding is not counted


@pytest.mark.e2e
def test_seed_rows_ddp_equals_single_process(docs_data, tmp_path):
    """One process with grad_accum=4 vs torchrun 2 x gloo with grad_accum=2: the same rows and padding per
    step, so the same losses and loss_tokens."""
    one, two = tmp_path / "one", tmp_path / "two"
    kw = {**SEED_RUN, "max_steps": 3, "eval_interval": 0,  # no dropout: its masks are drawn per rank
          "model_overrides": {**SEED_TINY, "dropout": 0.0}}
    run(args(docs_data, one, **kw))
    run(args(docs_data, two, **kw), nproc=2)
    (t1, _), (t2, _) = metrics(one), metrics(two)
    np.testing.assert_allclose([x for _, x in t2], [x for _, x in t1], rtol=0, atol=1e-5)
    assert loss_tokens(one) == loss_tokens(two)


@pytest.mark.e2e
def test_packed_filtered_without_filter_trains_like_packed(docs_data, tmp_path):
    """train.py with rows=packed_filtered, seed_min_tokens=0 is the packed run, bit for bit; loss_tokens of
    packed rows = tokens (every target is a real token)."""
    a, b = tmp_path / "a", tmp_path / "b"
    kw = dict(max_steps=3, eval_interval=0, seq_len=64, total_batch_tokens=256, model_overrides=SEED_TINY)
    run(args(docs_data, a, **kw))
    run(args(docs_data, b, rows="packed_filtered", seed_min_tokens=0, **kw))
    assert metrics(a) == metrics(b) and loss_tokens(a) == loss_tokens(b) == [256, 512, 768]
    assert ckpt(b)["loader"] == {**ckpt(a)["loader"], "rows": "packed_filtered", "min_tokens": 0}
