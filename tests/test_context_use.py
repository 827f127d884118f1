"""scripts/context_use.py: per-position losses against transformers' GPT2LMHeadModel on the same rows, the
score's windows on a known curve, and bad input through the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "scripts"))  # after the top-level modules: a script never shadows one

from context_use import row_losses, summarize  # noqa: E402

from _shards import write_dataset  # noqa: E402
from checkpoint import load_model  # noqa: E402
from conftest import save_tiny_gpt  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.e2e]


def test_loss_by_position_matches_transformers(tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    tiny = save_tiny_gpt(tmp_path, seed=3)
    rng = np.random.default_rng(0)
    T, rows = 64, 6
    data = write_dataset(tmp_path / "data", {"train": [rng.integers(0, 50257, 1000)],
                                             "val": [rng.integers(0, 50257, rows * T + 1 + 20)]})
    got = row_losses(load_model(tiny["ckpt"]), data, seq_len=T, batch_size=2)
    # reference: transformers on the val rows cut by hand (row i = tokens [i*T, i*T + T], targets shifted by 1)
    val = np.fromfile(data / "val_000000.bin", dtype="<u2").astype(np.int64)
    x = torch.tensor(np.stack([val[i * T:i * T + T + 1] for i in range(rows)]))
    hf = GPT2LMHeadModel.from_pretrained(tiny["hf"]).eval()
    with torch.no_grad():
        logits = hf(x[:, :-1]).logits
    want = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").double()
    assert got.shape == (rows, T) and torch.allclose(got, want, atol=1e-5)
    # --rows takes the first rows only, rounded down to whole batches
    got = row_losses(load_model(tiny["ckpt"]), data, T, 2, rows=5)
    assert got.shape == (4, T) and torch.allclose(got, want[:4], atol=1e-5)


def test_score_windows_and_stderr() -> None:
    losses = torch.full((2, 1024), 5.0, dtype=torch.float64)
    losses[:, 40:60] = 6.0  # early window
    losses[0, 450:550], losses[1, 450:550] = 4.0, 5.0  # late window: row scores -2 and -1
    res = summarize(losses)
    assert res["rows"] == 2 and res["icl_score"] == -1.5
    assert res["icl_score_stderr"] == pytest.approx(0.5)  # std of (-2, -1) = 0.7071, / sqrt(2)
    assert set(res["loss_by_position"]) == {"0-0", "1-9", "10-49", "50-99", "100-249", "250-499", "500-1023"}
    assert res["loss_by_position"]["0-0"] == 5.0
    assert res["loss_by_position"]["10-49"] == pytest.approx(5.25)  # 30 positions at 5.0, 10 at 6.0


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    tiny = save_tiny_gpt(tmp_path, seed=3)  # block_size 512
    write_dataset(tmp_path / "data", {"train": [np.arange(3000) % 100], "val": [np.arange(3000) % 100]})
    for args, msg in (([str(tiny["ckpt"]), "--seq-len", "1024"], "exceeds"),
                      ([str(tiny["ckpt"]), "--seq-len", "256"], "shorter than the score's late window"),
                      ([str(tmp_path / "missing.pt")], "does not exist")):
        r = subprocess.run([sys.executable, "scripts/context_use.py", *args, "--data-dir", str(tmp_path / "data")],
                           cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
