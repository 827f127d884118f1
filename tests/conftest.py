"""Shared test fixtures. Real data comes from ../shared/data (override with $SHARED_DATA_DIR); tests that
need it skip with a clear reason when it is absent."""

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
SHARED_DATA = Path(os.environ.get("SHARED_DATA_DIR", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked cuda (pytest.mark.cuda) skip on a machine without a CUDA GPU; `pytest -m cuda` selects them."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.py runs these)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


def shared_file(rel: str) -> Path:
    """Path of a file under the shared real-data folder, or skip the test saying what is missing."""
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"real data {p} not found (set SHARED_DATA_DIR to the folder with ../shared/data's files)")
    return p


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not found (set SHARED_DATA_DIR)")
    return SHARED_DATA


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
