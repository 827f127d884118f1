"""GPT-2's byte-level BPE as a tiktoken Encoding, built offline from encoder.json + vocab.bpe.

The two files come from the first folder that has both: $GPT2_BPE_DIR, then data/gpt2_bpe/ of this repository
(which ships OpenAI's files, MIT licence). They are checked against the sha256 that tiktoken itself pins for
"gpt2". If neither folder has them, tiktoken.get_encoding("gpt2") is tried (downloads on first use).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path

import tiktoken

from errors import UserError

REPO_BPE_DIR = Path(__file__).resolve().parent / "data" / "gpt2_bpe"
EOT = 50256  # <|endoftext|>
VOCAB_SIZE = 50257
# The hashes in tiktoken_ext/openai_public.py for the gpt2 encoding.
SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# tiktoken's r50k/gpt2 pre-tokenization pattern.
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def bpe_files_dir() -> Path | None:
    """The folder holding encoder.json and vocab.bpe, or None if there is none."""
    candidates = []
    if os.environ.get("GPT2_BPE_DIR"):
        candidates.append(Path(os.environ["GPT2_BPE_DIR"]))
    candidates.append(REPO_BPE_DIR)
    for d in candidates:
        if all((d / name).is_file() for name in SHA256):
            return d
    return None


def _verify(d: Path) -> None:
    for name, expected in SHA256.items():
        actual = hashlib.sha256((d / name).read_bytes()).hexdigest()
        if actual != expected:
            raise UserError(f"{d / name}: sha256 {actual} does not match GPT-2's {expected}; the file is not GPT-2's")


@lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's tokenizer: encode_ordinary(text) -> ids; decode(ids) -> text; eot_token == 50256."""
    d = bpe_files_dir()
    if d is not None:
        _verify(d)
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(d / "vocab.bpe"), encoder_json_file=str(d / "encoder.json"),
            vocab_bpe_hash=SHA256["vocab.bpe"], encoder_json_hash=SHA256["encoder.json"],
        )
        return tiktoken.Encoding(
            name="gpt2", explicit_n_vocab=VOCAB_SIZE, pat_str=PAT_STR, mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": EOT},
        )
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise UserError(
            f"GPT-2 tokenizer files not found: {REPO_BPE_DIR} is missing them; set GPT2_BPE_DIR to a folder with "
            f"encoder.json and vocab.bpe, or allow tiktoken to download them ({type(e).__name__})"
        ) from e


def save_hf_tokenizer(out_dir: str | Path) -> None:
    """Write GPT-2's tokenizer in Hugging Face format (vocab.json, merges.txt, tokenizer_config.json) so that
    AutoTokenizer.from_pretrained(out_dir) loads it."""
    d = bpe_files_dir()
    if d is None:
        raise UserError(f"GPT-2 tokenizer files not found in {REPO_BPE_DIR}; set GPT2_BPE_DIR to a folder with "
                        "encoder.json and vocab.bpe")
    _verify(d)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(d / "encoder.json", out / "vocab.json")
    shutil.copyfile(d / "vocab.bpe", out / "merges.txt")
    special = "<|endoftext|>"
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "add_prefix_space": False,
              "bos_token": special, "eos_token": special, "unk_token": special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
