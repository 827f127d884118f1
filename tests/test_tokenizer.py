"""tokenizer.py must be GPT-2's tokenizer exactly: checked against known ids and Hugging Face's GPT-2 tokenizer."""

from __future__ import annotations

import shutil

import pytest
import tiktoken

import tokenizer
from conftest import shared_file
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


def test_tinyshakespeare_round_trip_and_equals_hf_tokenizer():
    from transformers import GPT2TokenizerFast

    text = shared_file("tinyshakespeare.txt").read_text()
    ids = tokenizer.get_tokenizer().encode_ordinary(text)
    assert len(ids) == 338025  # the count shared/data/README.md gives (= nanoGPT's 301966 + 36059)
    assert tokenizer.get_tokenizer().decode(ids) == text
    d = tokenizer.bpe_files_dir()
    hf = GPT2TokenizerFast(vocab=str(d / "encoder.json"), merges=str(d / "vocab.bpe"))
    assert hf.encode("Hello world") == [15496, 995]  # guards against transformers 5's silent empty tokenizer
    assert hf(text)["input_ids"] == ids


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
