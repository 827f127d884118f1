"""A fresh clone of the committed repository runs the README's CPU quickstart with nothing from outside: no
full-data mirror folder, no hub, no tokenizer package. It prepares Tiny Shakespeare, trains
config/shakespeare_cpu.py shortened to its first 50 steps (100k tokens), samples and plots. The references:
the README quickstart's own output (step-0 train and val loss, printed by the full 200-step run), so the shipped
data, the shipped BPE files and the shard bytes must all be what that run used; and the unigram level (~6.5
nats: train-set token frequencies scored on val), which the 50-step val loss must beat (the full 200-step run
ends far lower)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from common import Dist
from conftest import REPO
from tokenizer import EOT, get_tokenizer
from train import TrainConfig, estimate_val_loss

pytestmark = pytest.mark.e2e  # whole programs: the quick loop (-m "not e2e") leaves them out


def unigram_level(clone: Path) -> float:
    """Val cross-entropy of predicting the train split's token frequencies (add-1e-3 smoothed), in nats."""
    from data import open_split

    data = clone / "data" / "shakespeare"
    train, val = np.concatenate(open_split(data, "train")), np.concatenate(open_split(data, "val"))
    counts = np.bincount(train, minlength=50257) + 1e-3
    return float(-np.log(counts[val] / counts.sum()).mean())


@pytest.mark.slow
def test_clone_prepares_shakespeare_and_trains(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout of the repository")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(clone)], check=True, timeout=60)
    empty = tmp_path / "no_mirror"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("GPT2_BPE_DIR", "PYTHONPATH", "TIKTOKEN_CACHE_DIR")}
    env |= {"SHARED_DATA_DIR": str(empty), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "WANDB_MODE": "disabled"}

    def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=clone, env=env, capture_output=True, text=True,
                              timeout=timeout)

    r = run("prepare_data.py", "--dataset", "shakespeare", "--no-progress", "--num-proc", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((clone / "data" / "shakespeare" / "meta.json").read_text())
    used = Path(meta["source"].split()[1])  # "shakespeare: PATH (speeches, ...)"
    assert used.resolve() == (clone / "data" / "tinyshakespeare.txt").resolve()  # the clone's own copy
    # the quickstart's "297k train / 34k val tokens" (6,497 + 725 speeches)
    assert {s: [(e["tokens"], e["docs"]) for e in meta["splits"][s]] for s in ("train", "val")} == {
        "train": [(297_121, 6_497)], "val": [(33_686, 725)]}

    r = run("train.py", "config/shakespeare_cpu.py", "--max_steps=50", "--eval_interval=50", "--log_interval=1",
            "--ckpt_interval=0", "--out_dir=out/fresh", "--device=cpu", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    # the README quickstart's first lines: the same init, data and first batch give the same losses
    assert "step 0: val loss 10.8363" in r.stdout, r.stdout
    assert "step 0/50 | loss 10.8282 |" in r.stdout, r.stdout
    out = clone / "out" / "fresh"
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in recs if "loss" in x]
    assert len(losses) == 50 and all(math.isfinite(v) for v in losses)
    val = [(x["step"], x["val_loss"]) for x in recs if "val_loss" in x]
    assert [st for st, _ in val] == [0, 50] and val[0][1] > 10.5 and val[-1][1] < unigram_level(clone), val
    # ckpt.pt holds the step-50 weights the run evaluated: its val loss, recomputed here on the clone's val
    # split, is the one the run logged at step 50
    ck = load_checkpoint(out / "ckpt.pt")
    assert ck["step"] == 50
    model = model_from_checkpoint(ck)
    cfg = dataclasses.replace(TrainConfig(**ck["train_config"]), data_dir=str(clone / "data" / "shakespeare"))
    assert estimate_val_loss(model, cfg, Dist(), nullcontext()) == pytest.approx(val[-1][1], rel=1e-5)

    s = run("sample.py", str(out / "ckpt.pt"), "--prompt", "ROMEO:", "--max_new_tokens", "20", "--device", "cpu")
    assert s.returncode == 0, s.stderr
    # the same sampling in this process (sample.py's defaults: seed 1337, temperature 0.8, top_k 200): the prompt
    # and exactly 20 new tokens, and sample.py prints their text (<|endoftext|>, the speech separator, left out);
    # the same seed gives the same text again
    enc = get_tokenizer()
    prompt = enc.encode_ordinary("ROMEO:")
    gen = torch.Generator().manual_seed(1337)
    with torch.no_grad():
        ids = model.eval().generate(torch.tensor([prompt]), 20, temperature=0.8, top_k=200, generator=gen)[0]
    assert ids[: len(prompt)].tolist() == prompt and len(ids) == len(prompt) + 20
    text = enc.decode([t for t in ids.tolist() if t != EOT])
    assert s.stdout == text + "\n", (s.stdout, text)
    p = run("plot.py", str(out))
    assert p.returncode == 0 and (out / "metrics.png").read_bytes()[:4] == b"\x89PNG", p.stderr
