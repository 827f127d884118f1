"""Shared test fixtures and where the tests' real data comes from.

Every test runs on a fresh clone: the repository ships Tiny Shakespeare and the GPT-2 BPE files (data/) and small
samples of the evaluation and corpus files (tests/data/, see its README). A full-data mirror folder, $SHARED_DATA_DIR
(default: shared/data beside the repository), holds the complete files in the same layout; where it has a file,
the tests use it instead of the sample, and the few checks that need a complete set skip without it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SHARED_DATA_DIR", REPO.parent / "shared" / "data"))  # the full-data mirror
SAMPLE_DATA = REPO / "tests" / "data"  # the first records of the full files (tests/data/README.md)
SHIPPED_DATA = REPO / "data"  # complete files the repository ships: tinyshakespeare.txt, gpt2_bpe/
EVAL_FILES = ("hellaswag_val.jsonl", "lambada_openai_test.jsonl", "wikitext2_raw/wiki.test.raw")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked cuda (pytest.mark.cuda) skip on a machine without a CUDA GPU; `pytest -m cuda` selects them."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.py runs these)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


def shared_file(rel: str) -> Path:
    """A real-data file: from the full-data mirror folder if it has it, else the sample in tests/data or the
    complete copy in data/ (skip the test if none has it)."""
    for base in (SHARED_DATA, SAMPLE_DATA, SHIPPED_DATA):
        if (base / rel).exists():
            return base / rel
    pytest.skip(f"real data {rel} not found in {SHARED_DATA} (the full-data mirror folder), tests/data or data/")


def full_file(rel: str) -> Path:
    """A file of the full-data mirror folder, for checks that need the complete set; skip if it is absent."""
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"needs the complete {rel}: not in the full-data mirror folder {SHARED_DATA} (set SHARED_DATA_DIR)")
    return p


def is_sample(p: Path) -> bool:
    """Whether shared_file gave the tests/data sample rather than a complete file."""
    return SAMPLE_DATA in p.parents


@pytest.fixture
def shared_data() -> Path:
    """A folder with the three evaluation files (eval_lm.py --data-dir layout): the full-data mirror folder if it
    has all of them, else tests/data."""
    return SHARED_DATA if all((SHARED_DATA / rel).is_file() for rel in EVAL_FILES) else SAMPLE_DATA


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, and torch's 2 OpenMP threads stall badly on a busy 2-core machine.
    Use per module: pytestmark = pytest.mark.usefixtures("one_torch_thread")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_tiny_gpt(d: Path, seed: int) -> dict:
    """A seeded random-init 2-layer GPT saved as our checkpoint (d/ckpt.pt) and as a HF folder (d/hf)."""
    from checkpoint import save_checkpoint
    from hf import export_hf_gpt2
    from model import GPT, GPTConfig

    torch.manual_seed(seed)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=512))
    save_checkpoint({"model": m.state_dict(), "model_config": m.config.to_dict()}, d / "ckpt.pt")
    export_hf_gpt2(m, d / "hf")
    return {"ckpt": d / "ckpt.pt", "hf": d / "hf", "dir": d}
