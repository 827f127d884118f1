"""The Wikipedia reproduction pipeline (scripts/reproduce_cpu.sh, docs/reproduction_cpu.md) on a 1% slice:
prepare one WikiExtractor file -> init checkpoint -> train baseline and doc_mask a few steps -> eval_lm.py
(lambada_openai + wikitext, local data, --limit) -> plot -> summary. Plus the full config's invariants."""

from __future__ import annotations

import io
import json
import math
import os
import struct
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _markdown import md_rows, printed  # noqa: E402
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


HALF_DIGIT = 0.5e-4 + 1e-9  # what printing with 4 decimals may change
# summary column -> (lm-eval task, metric) in eval_lm.py's JSON
SUMMARY_COLUMNS = {"lambada acc": ("lambada_openai_local", "acc"),
                   "lambada ppl": ("lambada_openai_local", "perplexity"),
                   "wikitext word_ppl": ("wikitext_local", "word_perplexity"),
                   "wikitext bits/byte": ("wikitext_local", "bits_per_byte")}


def lm_eval_value(res: dict, task: str, name: str) -> tuple[float, float | None]:
    se = res[task][f"{name}_stderr,none"]
    return res[task][f"{name},none"], (se if isinstance(se, float) and math.isfinite(se) else None)


@pytest.mark.slow  # the whole pipeline: ~1-2 min on 2 shared cores
def test_smoke_pipeline_outputs(smoke: Path) -> None:
    meta = load_meta(smoke / "data" / "wiki")
    assert sum(s["docs"] for s in meta["splits"]["val"]) == 4
    # one of the 96 files: ~0.2M tokens; its sample: ~3k
    assert sum(s["tokens"] for s in meta["splits"]["train"]) > (1_000 if SMOKE_DATA == SAMPLE_DATA else 100_000)
    runs = ("baseline_s1337", "doc_mask_s1337")
    assert load_model(smoke / "doc_mask_s1337" / "ckpt.pt").config.doc_mask
    assert not load_model(smoke / "baseline_s1337" / "ckpt.pt").config.doc_mask
    evals = {}
    for run in (*runs, "init_s1337"):
        res = json.loads((smoke / "eval" / f"{run}_L64.json").read_text())
        assert res["max_length"] == 64 and res["limit"] == 3
        assert res["n-samples"]["lambada_openai_local"]["effective"] == 3
        evals[run] = res["results"]
    init = evals["init_s1337"]
    assert init["wikitext_local"]["word_perplexity,none"] > 1000  # untrained: no better than ~uniform
    # Training lowered the loss, against the step-0 model on the same tokens. The 4 smoke steps took the val
    # loss from 10.828 to 10.727 nats (samples' wiki_00: 10.819 to 10.722) and wikitext from 3.348 to 3.319
    # bits/byte (word ppl 149.5k -> 135.0k; samples: the same to 3 digits) on 2026-12-05; the margins are about
    # half of that, and a run whose updates do nothing changes neither.
    # (lambada's 3 items: its 2% lower ppl is within lm-eval's stderr of ~3k, so it is not asserted.)
    for run in runs:
        recs = read_metrics(smoke / run)
        assert [r["step"] for r in recs if "loss" in r] == [0, 1, 2, 3]
        val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        assert [s for s, _ in val] == [0, 2, 4] and val[-1][1] < val[0][1] - 0.05, val
        wiki, wiki0 = evals[run]["wikitext_local"], init["wikitext_local"]
        assert wiki["bits_per_byte,none"] < wiki0["bits_per_byte,none"] - 0.01, (wiki, wiki0)
        assert wiki["word_perplexity,none"] < 0.95 * wiki0["word_perplexity,none"], (wiki, wiki0)
    # the summary, read against the files it summarises: every number of every run's row, and the
    # doc_mask - baseline row, from eval/*.json and metrics.jsonl (to the 4 printed decimals)
    summary = (smoke / "summary.md").read_text()
    table = md_rows(summary, "run")
    assert sorted(r["run"] for r in table) == sorted(evals) and all(r["max_length"] == "64" for r in table)
    for row in table:
        run = row["run"]
        if run == "init_s1337":
            assert row["final val loss"] == "—"
        else:
            last_val = [r["val_loss"] for r in read_metrics(smoke / run) if "val_loss" in r][-1]
            assert abs(float(row["final val loss"]) - last_val) <= HALF_DIGIT, (row, last_val)
        assert row["hellaswag acc"] == row["hellaswag acc_norm"] == "—"  # not evaluated
        for title, (task, name) in SUMMARY_COLUMNS.items():
            (v, e), (ref, ref_se) = printed(row[title]), lm_eval_value(evals[run], task, name)
            assert abs(v - ref) <= HALF_DIGIT and (e is None) == (ref_se is None), (run, title, row[title], ref)
            assert e is None or abs(e - ref_se) <= HALF_DIGIT, (run, title, row[title], ref_se)
    (diff,) = md_rows(summary, "seed")
    assert diff["seed"] == "s1337" and diff["max_length"] == "64"
    for title, (task, name) in SUMMARY_COLUMNS.items():
        (a, sa), (b, sb) = (lm_eval_value(evals[r], task, name) for r in ("doc_mask_s1337", "baseline_s1337"))
        v, e = printed(diff[title])
        assert abs(v - (a - b)) <= HALF_DIGIT, (title, diff[title], a - b)
        assert (e is None) == (sa is None) and (e is None or abs(e - math.hypot(sa, sb)) <= HALF_DIGIT), diff
    # curves.png: plot.py's three panels (loss, lr, tokens/s; no HellaSwag logged) of 5 x 4 in at 100 dpi, each
    # with the runs' lines drawn in it, not only their legend swatch (~50 px): matplotlib's colours C0, C1, ...
    # in plotting order (loss panel: baseline train, val, doc_mask train, val; the others: baseline, doc_mask).
    # The two smoke runs log the same losses, so doc_mask's lines cover baseline's in the loss and lr panels.
    png = (smoke / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (1500, 400)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)

    def pixels(panel: int, color: str) -> int:
        rgb = np.array([round(255 * c) for c in to_rgb(color)])
        return int((np.abs(img[:, 500 * panel: 500 * (panel + 1)] - rgb).sum(-1) <= 30).sum())

    assert min(pixels(0, "C2"), pixels(0, "C3"), pixels(1, "C1"), pixels(2, "C0"), pixels(2, "C1")) > 300, [
        [pixels(p, f"C{i}") for i in range(4)] for p in range(3)]


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
