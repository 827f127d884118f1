"""The seed-pipeline study (scripts/seed_rows_study.sh, docs/seed_pipeline.md) on tests/data: four arms x two
seeds, a few steps each, lm-eval --limit 3, the summary; then the study's promises: every arm's loss sees the
targets the script aimed at, and re-running a run's logged command reproduces its losses to the printed digit."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "scripts"))  # after the top-level modules: a script never shadows one

from seed_rows_study import ARM_ROWS, eot_split, same_losses, steps_for  # noqa: E402

from _markdown import md_rows, printed  # noqa: E402
from conftest import SAMPLE_DATA, hide_gpu  # noqa: E402
from monitor import read_metrics  # noqa: E402
from seed_rows import SeedRowLoader  # noqa: E402
from train_config import load_config  # noqa: E402

pytestmark = pytest.mark.e2e  # whole programs: the quick loop (-m "not e2e") leaves them out

ARMS = ("packed", "seed512", "seed512_nofilter", "packed_filtered")
ARM_ARGS = {"packed": [], "seed512": ["--rows=seed512"], "seed512_nofilter": ["--rows=seed512", "--seed_min_tokens=0"],
            "packed_filtered": ["--rows=packed_filtered"],
            "seed512_padloss": ["--rows=seed512", "--seed_loss_on_padding=true"]}  # on request (ARMS=...) only
SEEDS = (1337, 1338)


def _env(**kw: str) -> dict[str, str]:
    return hide_gpu({**os.environ, "PYTHON": sys.executable, "SHARED_DATA_DIR": str(SAMPLE_DATA), **kw})


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seed_rows_study") / "out"
    r = subprocess.run(["bash", str(REPO / "scripts" / "seed_rows_study.sh"), "--smoke"], cwd=REPO,
                       env=_env(OUT=str(out)), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def _launch_argv(run: Path) -> list[str]:
    return next(r["launch"]["argv"] for r in read_metrics(run) if "launch" in r)


def test_every_arm_of_the_script_has_a_summary_name_and_loads() -> None:
    """The shell script's arm_args, the summary's ARM_ROWS and ARM_ARGS above name the same arms with the same
    overrides, each of which load_config accepts; an unknown arm is refused."""
    script = (REPO / "scripts" / "seed_rows_study.sh").read_text()
    start = script.index("arm_args() {")
    func = script[start:script.index("\n}\n", start) + 3]
    assert set(ARM_ROWS) == set(ARM_ARGS)
    for arm, expect in ARM_ARGS.items():
        r = subprocess.run(["bash", "-c", f"{func}\narm_args {arm}"], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.split() == expect, (arm, r.stdout, r.stderr)
        cfg = load_config([str(REPO / "config" / "seed_rows_cpu.py"), *expect])
        assert cfg.rows == ("packed" if arm == "packed" else expect[0].split("=")[1])
        assert cfg.seed_loss_on_padding == (arm == "seed512_padloss")
        assert cfg.seed_min_tokens == (0 if arm == "seed512_nofilter" else 256)
    r = subprocess.run(["bash", "-c", f"{func}\narm_args seed1024"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown arm seed1024" in r.stderr


def within(cell: str, ref: float, decimals: int = 4) -> bool:
    """Whether a printed number is ref to its printed decimals."""
    return abs(printed(cell)[0] - ref) <= 0.5 * 10 ** -decimals + 1e-9


@pytest.mark.slow  # the whole study on samples: ~1.5 min on 2 shared cores
def test_study_runs_every_arm_and_summarizes(study: Path) -> None:
    """Every arm and seed was trained with its overrides and lowered the loss; the summary's numbers are those of
    the runs' own files: metrics.jsonl (val loss, steps, targets) and the eval JSON, whose per-item samples give
    the ln perplexities by hand (lambada: -mean item loglikelihood; wikitext: -sum ll / sum words)."""
    ref: dict[tuple[str, int], dict[str, float]] = {}
    val0: dict[int, set[float]] = {}
    for arm in ARMS:
        for seed in SEEDS:
            run = study / f"{arm}_s{seed}"
            argv = _launch_argv(run)
            assert f"--seed={seed}" in argv and all(a in argv for a in ARM_ARGS[arm]), argv
            if arm == "packed":
                assert not any(a.startswith("--rows=") for a in argv)
            recs = read_metrics(run)
            train = [r for r in recs if "loss" in r]
            val = [r for r in recs if "val_loss" in r]
            max_steps = int(next(a for a in argv if a.startswith("--max_steps=")).split("=")[1])
            assert [r["step"] for r in train] == list(range(max_steps)) and val[-1]["step"] == max_steps
            # training lowered the loss on the common val rows (the same tokens at every evaluation): by 0.038 to
            # 0.110 nats over the runs of 2026-12-05; a run whose updates do nothing keeps its step-0 value
            assert val[0]["step"] == 0 and val[-1]["val_loss"] < val[0]["val_loss"] - 0.02, val
            val0.setdefault(seed, set()).add(val[0]["val_loss"])
            res = json.loads((study / "eval" / f"{arm}_s{seed}_L512.json").read_text())
            assert res["max_length"] == 512 and res["limit"] == 3
            lam, wiki = res["samples"]["lambada_openai_local"], res["samples"]["wikitext_local"]
            assert len(lam) == 3 and len(wiki) == 3  # --log-samples: the items lm-eval scored
            ref[arm, seed] = {
                "val loss": val[-1]["val_loss"], "val bits/byte": val[-1]["val_bpb"], "steps": val[-1]["step"],
                "loss targets": train[-1]["loss_tokens"],
                "lambada ln ppl": -float(np.mean([d["perplexity"] for d in lam])),
                "wikitext ln word ppl": -sum(d["word_perplexity"][0] for d in wiki)
                / sum(d["word_perplexity"][1] for d in wiki),
                "lambada acc": res["results"]["lambada_openai_local"]["acc,none"],
                "wikitext bits/byte": res["results"]["wikitext_local"]["bits_per_byte,none"],
                "lambada ppl": res["results"]["lambada_openai_local"]["perplexity,none"],
                "wikitext word ppl": res["results"]["wikitext_local"]["word_perplexity,none"]}
    # same seed, same initial weights: every arm's step-0 val loss is the same number
    assert all(len(v) == 1 for v in val0.values()) and len(set().union(*val0.values())) == len(SEEDS), val0
    summary = (study / "summary.md").read_text()
    table = {row["run"]: row for row in md_rows(summary, "run")}
    assert sorted(table) == sorted(f"{a}_s{s}" for a, s in ref)
    for (arm, seed), want in ref.items():
        row = table[f"{arm}_s{seed}"]
        assert row["steps"] == str(want["steps"]) and row["loss targets"] == f"{want['loss targets']:,}", row
        for title in ("val loss", "val bits/byte", "lambada ln ppl", "lambada acc", "wikitext ln word ppl",
                      "wikitext bits/byte"):
            assert within(row[title], want[title]), (arm, seed, title, row[title], want[title])
        assert within(row["lambada ppl"], want["lambada ppl"], 0) and within(row["wikitext word ppl"],
                                                                             want["wikitext word ppl"], 1), row
    # the differences from packed: each seed's difference of the values above, their mean, and for the metrics
    # without items the documented verdict (same sign for every seed and |mean| > packed's seed-to-seed spread)
    diffs = {row["arm"].split(":")[0]: row for row in md_rows(summary, "arm")}
    assert sorted(diffs) == sorted(ARMS[1:])
    for arm, row in diffs.items():
        for title in ("val loss", "val bits/byte", "lambada ln ppl", "lambada acc", "wikitext ln word ppl",
                      "wikitext bits/byte"):
            cell = row[f"Δ {title}"]
            want = [ref[arm, s][title] - ref["packed", s][title] for s in SEEDS]
            per_seed = cell[cell.index("(") + 1: cell.rindex(")")].split(", ")
            assert len(per_seed) == len(SEEDS) and all(within(c, w) for c, w in zip(per_seed, want)), (cell, want)
            assert within(cell.split(" (")[0], float(np.mean(want))), (cell, want)
            if title in ("val loss", "val bits/byte", "wikitext bits/byte"):
                spread = abs(ref["packed", 1337][title] - ref["packed", 1338][title])
                beyond = len({np.sign(w) for w in want}) == 1 and abs(np.mean(want)) > spread
                assert ("**beyond noise**" in cell) == beyond, (arm, title, cell, want, spread)
    # curves.png: plot_curves' two panels (12 x 4.5 in at 100 dpi), each arm's colour (C0..C3 in ARMS order)
    # drawn in both, beyond the val panel's legend swatches; the train panel's lines are drawn at alpha 0.8
    png = (study / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1200, 450)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(float)
    for i in range(len(ARMS)):
        rgb = 255 * np.array(to_rgb(f"C{i}"))
        val_px = int((np.abs(img[:, :600] - rgb).sum(-1) <= 30).sum())
        train_px = int((np.abs(img[:, 600:] - (0.8 * rgb + 0.2 * 255)).sum(-1) <= 30).sum())
        assert val_px > 300 and train_px > 100, (ARMS[i], val_px, train_px)


@pytest.mark.slow  # needs the study's outputs
def test_steps_give_every_arm_the_aimed_loss_targets(study: Path) -> None:
    """steps_for's per-row mean against the loader's own count over one epoch (micro_batch 1: every row once)."""
    data = study / "data" / "wiki"
    base = [str(REPO / "config" / "seed_rows_cpu.py"), f"--data_dir={data}", "--micro_batch=1",
            "--total_batch_tokens=512"]
    for min_tokens in (256, 0):
        loader = SeedRowLoader(data, "train", 1, min_tokens=min_tokens, seed=1)
        n = loader.n_rows
        for _ in range(n):
            loader.next_batch()
        per_row = loader.loss_tokens / n
        target = 10 * 512
        expect = round(target / per_row)
        assert steps_for(target, base + ["--rows=seed512", f"--seed_min_tokens={min_tokens}"]) == expect
        assert per_row < 511  # short documents and tails: fewer targets than a packed row's 512
    assert steps_for(10 * 512, base) == 10 == steps_for(10 * 512, base + ["--rows=packed_filtered"])
    # the padding targets come on top of the real ones: padloss takes seed512's steps (and so its rows)
    seed = base + ["--rows=seed512"]
    assert steps_for(10 * 512, seed + ["--seed_loss_on_padding=true"]) == steps_for(10 * 512, seed)


@pytest.mark.slow  # reruns one of the study's runs (a few seconds)
def test_rerun_reproduces_losses_to_the_printed_digit(study: Path, tmp_path: Path) -> None:
    run = study / "seed512_s1337"
    argv = [a if not a.startswith("--out_dir=") else f"--out_dir={tmp_path / 'again'}" for a in _launch_argv(run)]
    r = subprocess.run([sys.executable, *argv], cwd=REPO, env=_env(OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    verdict = same_losses(run, tmp_path / "again")
    assert ": 0 differ at 4 decimals" in verdict, verdict
    # and the comparison can fail: one loss changed in its 4th decimal
    shutil.copytree(tmp_path / "again", tmp_path / "changed")
    lines = (tmp_path / "changed" / "metrics.jsonl").read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if '"loss"' in line)
    rec = json.loads(lines[i])
    rec["loss"] += 3e-4
    lines[i] = json.dumps(rec)
    (tmp_path / "changed" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert ": 1 differ at 4 decimals" in same_losses(run, tmp_path / "changed")


@pytest.mark.slow  # needs the study's outputs
def test_eot_split_recomputes_train_py_val_loss(study: Path) -> None:
    table = eot_split(study, list(ARMS), list(SEEDS))
    for arm in ARMS:
        for seed in SEEDS:
            row = next(line for line in table.splitlines() if line.startswith(f"| {arm}_s{seed} |"))
            val = [r["val_loss"] for r in read_metrics(study / f"{arm}_s{seed}") if "val_loss" in r][-1]
            cells = [c.strip() for c in row.split("|")[2:-1]]
            assert float(cells[0]) == pytest.approx(val, abs=1e-4)
            # the three parts' shares add up to the mean
            shares = [float(c.split("; ")[1].split(" of")[0]) for c in cells[1:]]
            assert sum(shares) == pytest.approx(val, abs=2e-4)
