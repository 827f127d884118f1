"""The Wikipedia reproduction pipeline (scripts/reproduce_cpu.sh, docs/reproduction_cpu.md) on a 1% slice:
prepare one WikiExtractor file -> init checkpoint -> train baseline and doc_mask a few steps -> eval_lm.py
(lambada_openai + wikitext, local data, --limit) -> plot -> summary. Plus the full config's invariants."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from checkpoint import load_checkpoint, load_model  # noqa: E402
from common import Dist  # noqa: E402
from conftest import SAMPLE_DATA, SHARED_DATA, hide_gpu  # noqa: E402
from data import TokenLoader, load_meta  # noqa: E402
from monitor import read_metrics  # noqa: E402
from train import estimate_val_loss  # noqa: E402
from train_config import load_config  # noqa: E402

pytestmark = pytest.mark.e2e  # whole programs: the quick loop (-m "not e2e") leaves them out

CONFIG = str(REPO / "config" / "wikipedia_cpu.py")


def test_wikipedia_config_is_the_seed_recipe() -> None:
    cfg = load_config([CONFIG])
    mc = cfg.model_config()  # also checks seq_len <= block_size
    assert cfg.seq_len <= mc.block_size and mc.block_size >= 1024  # eval at max_length 512 and 1024
    assert (cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.grad_clip, cfg.min_lr) == (0.9, 0.95, 0.1, 1.0, 0.0)
    assert cfg.total_batch_tokens % (cfg.micro_batch * cfg.seq_len) == 0
    steps = cfg.total_steps
    assert 0 < cfg.warmup_steps < steps // 5
    assert cfg.dtype == "fp32" and cfg.init_from == "scratch"
    # GPT-2-shaped: the default parts (learned positions, pre-LayerNorm, GELU, biases, tied embeddings)
    base = type(mc)()
    for f in ("pos", "norm", "norm_placement", "mlp", "bias", "tie_embeddings", "doc_mask"):
        assert getattr(mc, f) == getattr(base, f), f
    assert mc.n_embd % mc.n_head == 0


SMOKE_FILES = ("corpus_wikipedia_en/AA/wiki_00", "lambada_openai_test.jsonl", "wikitext2_raw/wiki.test.raw")
# the full-data mirror folder if it has the smoke run's files, else the samples (wiki_00: 9 short articles)
SMOKE_DATA = SHARED_DATA if all((SHARED_DATA / rel).is_file() for rel in SMOKE_FILES) else SAMPLE_DATA


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("repro") / "out"
    env = hide_gpu({**os.environ, "OUT": str(out), "SHARED_DATA_DIR": str(SMOKE_DATA), "SEEDS": "1337",
                    "TASKS": "lambada_openai,wikitext", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    r = subprocess.run(["bash", str(REPO / "scripts" / "reproduce_cpu.sh"), "--smoke"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.mark.slow  # the whole pipeline: ~1-2 min on 2 shared cores
def test_smoke_pipeline_outputs(smoke: Path) -> None:
    meta = load_meta(smoke / "data" / "wiki")
    assert sum(s["docs"] for s in meta["splits"]["val"]) == 4
    # one of the 96 files: ~0.2M tokens; its sample: ~3k
    assert sum(s["tokens"] for s in meta["splits"]["train"]) > (1_000 if SMOKE_DATA == SAMPLE_DATA else 100_000)
    for run in ("baseline_s1337", "doc_mask_s1337"):
        recs = read_metrics(smoke / run)
        losses = [r["loss"] for r in recs if "loss" in r]
        assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
        assert (smoke / run / "ckpt.pt").is_file()
    assert load_model(smoke / "doc_mask_s1337" / "ckpt.pt").config.doc_mask
    assert not load_model(smoke / "baseline_s1337" / "ckpt.pt").config.doc_mask
    for run in ("baseline_s1337", "doc_mask_s1337", "init_s1337"):
        res = json.loads((smoke / "eval" / f"{run}_L64.json").read_text())
        assert res["max_length"] == 64 and res["limit"] == 3
        lam, wiki = res["results"]["lambada_openai_local"], res["results"]["wikitext_local"]
        assert 0.0 <= lam["acc,none"] <= 1.0 and math.isfinite(lam["perplexity_stderr,none"])
        # a random 50k-way model sits near the vocabulary size per token; a word spans >1 token
        for v in (lam["perplexity,none"], wiki["word_perplexity,none"]):
            assert math.isfinite(v) and v > 1.0
        assert res["n-samples"]["lambada_openai_local"]["effective"] == 3
    init = json.loads((smoke / "eval" / "init_s1337_L64.json").read_text())["results"]
    assert init["wikitext_local"]["word_perplexity,none"] > 1000  # untrained: no better than ~uniform
    assert (smoke / "curves.png").stat().st_size > 10_000
    summary = (smoke / "summary.md").read_text()
    assert "| init_s1337 | 64 |" in summary and "doc_mask − baseline" in summary


@pytest.mark.slow  # needs the smoke pipeline's outputs
def test_init_checkpoint_is_train_py_step_0(smoke: Path) -> None:
    """`train.py --max_steps=0` writes the weights a real run starts from: their val loss and first-batch loss
    equal the step-0 values the baseline run logged (computed before any update) for the same config and seed."""
    ckpt_model = load_model(smoke / "init_s1337" / "ckpt.pt")
    recs = read_metrics(smoke / "baseline_s1337")
    val0 = next(r["val_loss"] for r in recs if r["step"] == 0 and "val_loss" in r)
    loss0 = next(r["loss"] for r in recs if r["step"] == 0 and "loss" in r)
    train_cfg = load_checkpoint(smoke / "init_s1337" / "ckpt.pt")["train_config"]
    cfg = load_config([CONFIG] + [f"--{k}={v}" for k, v in train_cfg.items()
                                  if k in ("data_dir", "micro_batch", "seq_len", "eval_tokens", "seed")])
    ckpt_model.train()  # as train.py: estimate_val_loss switches to eval and back
    assert estimate_val_loss(ckpt_model, cfg, Dist(), nullcontext()) == pytest.approx(val0, rel=1e-6)
    x, y = TokenLoader(cfg.data_dir, "train", cfg.micro_batch, cfg.seq_len, 0, 1, seed=cfg.seed).next_batch()
    with torch.no_grad():
        _, loss = ckpt_model(x, y)
    assert loss.item() == pytest.approx(loss0, rel=1e-6)


@pytest.mark.slow  # needs the smoke pipeline's outputs; the rerun itself takes a few seconds
@pytest.mark.usefixtures("one_torch_thread")  # as the smoke run (OMP_NUM_THREADS=1): fused CPU AdamW's rounding
def test_same_seed_same_losses(smoke: Path, tmp_path: Path) -> None:  # depends on the thread count
    """docs/reproduction_cpu.md promises that re-running a command reproduces its numbers: train the smoke
    baseline again from its saved train_config and compare every logged loss bit for bit."""
    import dataclasses

    import train

    saved = load_checkpoint(smoke / "baseline_s1337" / "ckpt.pt")["train_config"]
    cfg = dataclasses.replace(train.TrainConfig(**saved), out_dir=str(tmp_path / "again"), init_from="scratch",
                              device="cpu")  # the smoke run's CPU (its saved device is "auto")
    again = train.train(cfg)["losses"]
    recs = read_metrics(smoke / "baseline_s1337")
    assert again == [r["loss"] for r in recs if "loss" in r]
