"""The bad-input table of docs/reliability.md, one row per test, each driving a real CLI in a subprocess:
one line on stderr naming the problem (and the fix), exit code 2, no traceback, and no file clobbered (every
file under the test's folder, including a previous run's ckpt.pt and metrics.jsonl, is unchanged afterwards).
Rows already driven through the CLI elsewhere are not repeated here; README points at those tests."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from _shards import markov_dataset, markov_tokens, write_dataset
from conftest import hide_gpu
from test_train import args

pytestmark = pytest.mark.e2e  # whole programs: the quick loop (-m "not e2e") leaves them out

REPO = Path(__file__).resolve().parent.parent
KW = dict(max_steps=2, eval_interval=1)


@pytest.fixture(scope="module")
def prev(tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny run (data, out_dir with ckpt.pt and metrics.jsonl): what a typo must not destroy."""
    root = tmp_path_factory.mktemp("prev")
    data = markov_dataset(root / "data", train_tokens=6000, val_tokens=2000)
    r = cli("train.py", *args(data, root / "out", **KW))
    assert r.returncode == 0, r.stderr
    return data, root / "out"


@pytest.fixture
def world(prev, tmp_path) -> tuple[Path, Path]:
    """A private copy of the previous run's data and out_dir for one row to break."""
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(prev[0], data)
    shutil.copytree(prev[1], out)
    return data, out


def cli(script: str, *argv: object) -> subprocess.CompletedProcess:
    env = hide_gpu({**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    return subprocess.run([sys.executable, str(REPO / script), *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def check(root: Path, script: str, argv: list[object], *words: str, new_ok: tuple[str, ...] = ()) -> str:
    """Run the CLI; assert the one-line error holding `words`, and that no file under root changed (files in
    new_ok may appear: a run that failed mid-way keeps its log)."""
    before = snapshot(root)
    r = cli(script, *argv)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stdout[-1000:] + r.stderr[-2000:]
    assert len(lines) == 1 and re.match(r"^(\S+\.py: )?error: ", lines[0]) and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k not in new_ok or k in before} == before  # nothing clobbered
    return lines[0]


# ----------------------------------------------------------------------------------------------------
# data (missing data_dir: tests/test_config.py::test_cli_errors)


def _no_meta(d: Path) -> None:
    (d / "meta.json").unlink()


def _bad_meta(d: Path) -> None:
    (d / "meta.json").write_text('{"format": 1, "splits": {')


def _odd_shard(d: Path) -> None:
    with open(d / "train_000001.bin", "ab") as f:
        f.write(b"\x01")


DATA_ROWS: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "meta-missing": (_no_meta, ["meta.json is missing", "re-run prepare_data.py"]),
    "meta-corrupt": (_bad_meta, ["meta.json is not valid JSON", "re-run prepare_data.py --overwrite"]),
    "odd-sized-shard": (_odd_shard, ["train_000001.bin has an odd byte count", "truncated"]),
}


@pytest.mark.parametrize("row", DATA_ROWS)
def test_data_row(world, tmp_path, row):
    data, out = world
    breaker, words = DATA_ROWS[row]
    breaker(data)
    check(tmp_path, "train.py", [*args(data, out, **KW), "--init_from=auto"], *words)


def test_data_token_id_beyond_vocab(tmp_path):
    """Ids are checked per batch (a full scan of a 10B-token split would delay every start): the first batch
    holding one fails before any checkpoint is written (the step-0 val loss already logged stays)."""
    toks = markov_tokens(6000, 64, seed=1) + 64  # another tokenizer's ids: all >= the declared vocab of 64
    data = write_dataset(tmp_path / "data", {"train": [toks], "val": [markov_tokens(2000, 64, seed=2)]},
                         vocab_size=64)
    out = tmp_path / "out"
    line = check(tmp_path, "train.py", args(data, out, **KW), "contains token id", ">= vocab_size 64",
                 "re-run prepare_data.py", new_ok=("out/metrics.jsonl",))
    assert "train_000000.bin" in line and not (out / "ckpt.pt").exists()


def test_data_shorter_than_one_batch(tmp_path):
    data = write_dataset(tmp_path / "data", {"train": [markov_tokens(20, 64)], "val": [markov_tokens(40, 64)]},
                         vocab_size=64)
    check(tmp_path, "train.py", args(data, tmp_path / "out", **KW), "fewer than one batch",
          "use a smaller micro_batch / seq_len or more data")


def test_data_vocab_larger_than_model(world, tmp_path):
    data, out = world
    check(tmp_path, "train.py", [*args(data, tmp_path / "new", **KW), "--model_overrides.vocab_size=32"],
          "vocab_size=32 is smaller than the dataset's (64", "set model_overrides vocab_size >= 64")


# ----------------------------------------------------------------------------------------------------
# config (missing file, syntax error, unknown key, wrong type, batch arithmetic: tests/test_config.py)


def test_config_out_dir_is_a_file(world, tmp_path):
    data, out = world
    check(tmp_path, "train.py", args(data, out / "metrics.jsonl", **KW), "metrics.jsonl is a file",
          "choose another out_dir")


def test_config_wrong_type_in_file(world, tmp_path):
    data, out = world
    cfg = tmp_path / "cfg.py"
    cfg.write_text("max_steps = '10'\n")
    check(tmp_path, "train.py", [cfg, *args(data, out, **KW), "--init_from=auto"],
          "max_steps must be int, got str '10'")


# ----------------------------------------------------------------------------------------------------
# checkpoint (missing for train.py: tests/test_config.py; for eval: tests/test_eval_*.py)


def test_checkpoint_missing_for_sample(tmp_path):
    check(tmp_path, "sample.py", [tmp_path / "out" / "ckpt.pt"], "ckpt.pt does not exist", "check the path")


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_checkpoint_truncated(world, tmp_path, script):
    """train.py falls back to an older checkpoint that loads (tests/test_faults.py); here none does."""
    data, out = world
    for f in out.glob("ckpt*.pt"):
        blob = f.read_bytes()
        f.write_bytes(blob[: len(blob) // 2])
    argv = [*args(data, out, **KW), "--init_from=resume"] if script == "train.py" else [out / "ckpt.pt"]
    check(tmp_path, script, argv, "is not a readable checkpoint (truncated", "use an intact copy")


def test_checkpoint_architecture_mismatch(world, tmp_path):
    data, out = world
    check(tmp_path, "train.py", [*args(data, out, **KW), "--init_from=resume", "--model_overrides.n_layer=3"],
          "the config's model differs", "'n_layer': (2, 3)", "use the checkpoint's model settings")


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_checkpoint_newer_format(world, tmp_path, script):
    data, out = world
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    for f in out.glob("ckpt*.pt"):
        torch.save({**ck, "format": 99}, f)
    argv = [*args(data, out, **KW), "--init_from=auto"] if script == "train.py" else [out / "ckpt.pt"]
    check(tmp_path, script, argv, "written by a newer version (format 99 > 1)", "update this code")


class Payload:
    """Unpickling this runs `touch <marker>`: what a malicious 'checkpoint' would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("script", ["sample.py", "eval_hellaswag.py"])
def test_checkpoint_untrusted_pickle_is_not_executed(tmp_path, script):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "model_config": {}, "x": Payload(marker)}, evil)
    check(tmp_path, script, [evil], "refused to load it", "use a checkpoint written by train.py")
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the file really is malicious: a plain unpickle runs the payload
    assert marker.exists()


# ----------------------------------------------------------------------------------------------------
# CLI (eval: missing data, wrong fields: tests/test_eval_hellaswag.py, tests/test_eval_lm.py)


@pytest.mark.parametrize("script, argv, words", [
    ("train.py", ["--lrr=1e-3"], ["--lrr: unknown key; did you mean lr"]),
    ("sample.py", ["x.pt", "--bogus"], ["unrecognized arguments: --bogus", "see --help"]),
    ("eval_hellaswag.py", ["x.pt", "--bogus"], ["unrecognized arguments: --bogus", "see --help"]),
    ("prepare_data.py", ["--bogus"], ["unrecognized arguments: --bogus", "see --help"]),
])
def test_cli_unknown_flag(tmp_path, script, argv, words):
    check(tmp_path, script, argv, *words)


def test_rows_used_real_files(prev):
    """Guard for the fixture itself: the previous run really wrote what the rows protect."""
    _, out = prev
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert ck["step"] == 2 and [r["step"] for r in recs if "loss" in r] == [0, 1]
    assert np.isfinite([r["val_loss"] for r in recs if "val_loss" in r]).all()
