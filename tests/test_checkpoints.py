"""A run's checkpoint rotation (checkpoint.RunCheckpoints) and the run-log repairs a resume depends on: a torn
metrics.jsonl line, the wandb rewind, val loss that does not depend on micro_batch. The fault-driven
checks (a corrupt newest checkpoint resumed from the one before, bit for bit; ranks with different data) are in
tests/test_faults.py."""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import pytest

import train
from _shards import markov_dataset
from checkpoint import RunCheckpoints, load_checkpoint
from common import Dist
from monitor import RunLog, read_metrics, wandb_resume_kwargs
from test_train import args, run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return markov_dataset(tmp_path_factory.mktemp("markov") / "data")


def test_keeps_the_last_n_step_checkpoints_and_ckpt_pt_is_the_newest(data, tmp_path):
    out = tmp_path / "run"
    run(args(data, out, max_steps=10, ckpt_interval=2, keep_checkpoints=3, eval_interval=0))
    names = sorted(p.name for p in out.glob("ckpt*.pt"))
    assert names == ["ckpt.pt", "ckpt_00000006.pt", "ckpt_00000008.pt", "ckpt_00000010.pt"]
    assert (out / "ckpt.pt").samefile(out / "ckpt_00000010.pt")  # a link: the newest costs no extra disk
    assert [load_checkpoint(out / n)["step"] for n in names[1:]] == [6, 8, 10]
    assert not list(out.glob("*.tmp"))


def test_keep_zero_is_ckpt_pt_only_and_keep_best_links_the_lowest_val(data, tmp_path):
    out = tmp_path / "zero"
    run(args(data, out, max_steps=4, ckpt_interval=2, keep_checkpoints=0))
    assert [p.name for p in out.glob("ckpt*.pt")] == ["ckpt.pt"]
    out = tmp_path / "best"
    run(args(data, out, max_steps=9, ckpt_interval=3, eval_interval=3, keep_checkpoints=1, keep_best=True))
    vals = {r["step"]: r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r}
    best_step = min((s for s in vals if s % 3 == 0 and s > 0), key=vals.get)  # saved steps with a val loss
    assert load_checkpoint(out / "ckpt_best.pt")["step"] == best_step
    assert load_checkpoint(out / "ckpt_best.pt")["best_val_loss"] == vals[best_step]


def test_newest_first_skips_the_link_and_a_started_over_run_removes_newer_files(tmp_path):
    ckpts = RunCheckpoints(tmp_path, keep=2)
    for step in (2, 4, 6):
        ckpts.save({"model": {}, "model_config": {}, "step": step}, step)
    assert [p.name for p in ckpts.newest_first()] == ["ckpt.pt", "ckpt_00000004.pt"]
    ckpts.save({"model": {}, "model_config": {}, "step": 1}, 1)  # a new run in the same folder (overwrite)
    assert [p.name for p in ckpts.newest_first()] == ["ckpt.pt"]
    assert load_checkpoint(ckpts.newest_first()[0])["step"] == 1


def test_load_newest_falls_back_with_one_line_and_fails_when_none_loads(tmp_path):
    ckpts = RunCheckpoints(tmp_path, keep=2)
    for step in (2, 4):
        ckpts.save({"model": {}, "model_config": {}, "step": step}, step)
    blob = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(blob[: len(blob) // 2])  # in place: the step-4 link is the same file
    lines: list[str] = []
    ckpt, path = ckpts.load_newest(lines.append)
    assert ckpt["step"] == 2 and path.name == "ckpt_00000002.pt"
    assert len(lines) == 1 and "ckpt.pt is not a readable checkpoint" in lines[0] and "trying the previous" in lines[0]
    (tmp_path / "ckpt_00000002.pt").write_bytes(b"")
    with pytest.raises(Exception, match="no checkpoint in .* loads"):
        ckpts.load_newest(lines.append)
    assert RunCheckpoints(tmp_path / "empty", keep=2).load_newest(lines.append) is None


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(data, tmp_path):
    """A run killed mid-write leaves half a JSON line; the resume drops it (one warning) instead of failing."""
    out = tmp_path / "torn"
    run(args(data, out, max_steps=4, ckpt_interval=2))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # no newline: torn
    r = run(args(data, out, max_steps=6, ckpt_interval=2, init_from="resume"))
    assert "is not a metrics record (torn by a crash?): dropped" in r.stderr
    recs = read_metrics(out / "metrics.jsonl")
    assert [x["step"] for x in recs if "loss" in x] == list(range(6))


def test_wandb_resume_rewinds_to_the_checkpoint_step(tmp_path):
    """A resumed run forks its wandb history at the checkpoint's step (resume_from), so the redone steps are
    not rejected; a fresh run just names its id; a wandb without resume_from warns."""
    calls = []

    def init(project=None, name=None, config=None, dir=None, id=None, resume=None, resume_from=None):  # noqa: A002
        calls.append({"id": id, "resume": resume, "resume_from": resume_from})
        return types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)

    fake = types.SimpleNamespace(init=init)
    cfg = train.TrainConfig(data_dir=str(tmp_path), out_dir=str(tmp_path), max_steps=10, wandb_log=True)
    sys.modules["wandb"], saved = fake, sys.modules.get("wandb")
    try:
        RunLog(cfg, Dist(), tmp_path, 6, 10, "abcd1234")
        RunLog(cfg, Dist(), tmp_path, 0, 10, None)
    finally:
        if saved is not None:
            sys.modules["wandb"] = saved
        else:
            del sys.modules["wandb"]
    assert calls[0] == {"id": None, "resume": None, "resume_from": "abcd1234?_step=6"}
    assert calls[1]["resume"] == "allow" and calls[1]["resume_from"] is None and len(calls[1]["id"]) == 8
    old = types.SimpleNamespace(init=lambda project=None, id=None, resume=None: None)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert wandb_resume_kwargs(old, "abcd1234", 6, resuming=True) == {"id": "abcd1234", "resume": "allow"}
    assert any("cannot rewind" in str(x.message) for x in w)


def test_val_loss_does_not_depend_on_micro_batch(data, tmp_path):
    """eval_tokens fixes the val tokens: micro_batch 4 and 8 (and a partial last batch) score the same rows."""
    from contextlib import nullcontext

    from model import GPT, GPTConfig
    from test_train import TINY

    model = GPT(GPTConfig(**TINY))
    vals = []
    for mb in (4, 8, 5):
        cfg = train.load_config(args(data, tmp_path, micro_batch=mb, seq_len=16, total_batch_tokens=1280,
                                     eval_tokens=16 * 40))
        vals.append(train.estimate_val_loss(model, cfg, Dist(), nullcontext()))
    assert vals[1] == pytest.approx(vals[0], rel=1e-6, abs=0) and vals[2] == pytest.approx(vals[0], rel=1e-6, abs=0)
    cfg = train.load_config(args(data, tmp_path, micro_batch=4, seq_len=16, eval_tokens=16 * 44))
    assert train.estimate_val_loss(model, cfg, Dist(), nullcontext()) != vals[0]  # other tokens, other loss
