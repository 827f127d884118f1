"""A run's checkpoint rotation (checkpoint.RunCheckpoints) and the run-log repairs a resume depends on: a torn
metrics.jsonl line, the wandb rewind, val loss that does not depend on micro_batch. The fault-driven
checks (a corrupt newest checkpoint resumed from the one before, bit for bit; ranks with different data) are in
tests/test_faults.py."""

from __future__ import annotations

import dataclasses
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from _shards import markov_dataset
from checkpoint import RunCheckpoints, load_checkpoint
from common import Dist
from monitor import RunLog, read_metrics, wandb_resume_kwargs
from test_train import args, run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return markov_dataset(tmp_path_factory.mktemp("markov") / "data")


@pytest.mark.e2e
def test_keeps_the_last_n_step_checkpoints_and_ckpt_pt_is_the_newest(data, tmp_path):
    out = tmp_path / "run"
    run(args(data, out, max_steps=10, ckpt_interval=2, keep_checkpoints=3, eval_interval=0))
    names = sorted(p.name for p in out.glob("ckpt*.pt"))
    assert names == ["ckpt.pt", "ckpt_00000006.pt", "ckpt_00000008.pt", "ckpt_00000010.pt"]
    assert (out / "ckpt.pt").samefile(out / "ckpt_00000010.pt")  # a link: the newest costs no extra disk
    assert [load_checkpoint(out / n)["step"] for n in names[1:]] == [6, 8, 10]
    assert not list(out.glob("*.tmp"))


@pytest.mark.e2e
def test_keep_zero_is_ckpt_pt_only_and_keep_best_links_the_lowest_val(data, tmp_path):
    out = tmp_path / "zero"
    run(args(data, out, max_steps=4, ckpt_interval=2, keep_checkpoints=0))
    assert [p.name for p in out.glob("ckpt*.pt")] == ["ckpt.pt"]
    out = tmp_path / "best"
    run(args(data, out, max_steps=9, ckpt_interval=3, eval_interval=3, keep_checkpoints=1, keep_best=True))
    vals = {r["step"]: r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r}
    best_step = min((s for s in vals if s % 3 == 0 and s > 0), key=vals.get)  # saved steps with a val loss
    assert load_checkpoint(out / "ckpt_best.pt")["step"] == best_step
    # a checkpoint is written before its step's evaluation: it knows the best val loss of the steps before it
    assert load_checkpoint(out / "ckpt_best.pt")["best_val_loss"] == min(v for s, v in vals.items() if s < best_step)


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


@pytest.mark.e2e
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


class FakeWandb:
    """wandb.init / run.log / run.finish as the W&B client calls them; `refuse` names what the service refuses:
    "resume_from" (run rewind is a private-preview feature most accounts are refused), "init", "log"."""

    def __init__(self, refuse: tuple[str, ...] = ()):
        self.refuse, self.inits, self.logged = refuse, [], []

    def init(self, project=None, name=None, config=None, dir=None, id=None, resume=None, resume_from=None):  # noqa: A002
        self.inits.append({"id": id, "resume": resume, "resume_from": resume_from})
        if "init" in self.refuse or (resume_from and "resume_from" in self.refuse):
            raise RuntimeError("error: resume_from is not enabled for this entity" if resume_from else "offline")

        def log(rec: dict, step: int) -> None:
            if "log" in self.refuse:
                raise ConnectionError("network is unreachable")
            self.logged.append(step)

        return types.SimpleNamespace(log=log, finish=lambda: None)


@pytest.fixture
def fake_wandb(monkeypatch):
    def install(refuse: tuple[str, ...] = ()) -> FakeWandb:
        fake = FakeWandb(refuse)
        monkeypatch.setitem(sys.modules, "wandb", fake)
        return fake
    return install


def test_wandb_resume_rewinds_to_the_checkpoint_step(tmp_path, fake_wandb):
    """A resumed run forks its wandb history at the checkpoint's step (resume_from), so the redone steps are
    not rejected; a fresh run just names its id; a wandb without resume_from warns."""
    fake = fake_wandb()
    cfg = train.TrainConfig(data_dir=str(tmp_path), out_dir=str(tmp_path), max_steps=10, wandb_log=True)
    RunLog(cfg, Dist(), tmp_path, 6, 10, "abcd1234", resumed=True)
    RunLog(cfg, Dist(), tmp_path, 0, 10, None)
    assert fake.inits[0] == {"id": None, "resume": None, "resume_from": "abcd1234?_step=6"}
    assert fake.inits[1]["resume"] == "allow" and fake.inits[1]["resume_from"] is None and len(fake.inits[1]["id"]) == 8
    old = types.SimpleNamespace(init=lambda project=None, id=None, resume=None: None)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert wandb_resume_kwargs(old, "abcd1234", 6, resuming=True) == [{"id": "abcd1234", "resume": "allow"}]
    assert any("cannot rewind" in str(x.message) for x in w)


def test_wandb_failures_never_stop_training(data, tmp_path, fake_wandb):
    """The W&B service refusing the rewind: the resume continues the same wandb run plainly, with one warning.
    wandb failing to start, or to log mid-run: one warning, and training goes on with every record in
    metrics.jsonl."""
    cfg = train.load_config(args(data, tmp_path / "run", max_steps=4, ckpt_interval=2, wandb_log=True))
    fake = fake_wandb(refuse=("resume_from",))
    train.train(cfg)
    with pytest.warns(UserWarning, match="wandb refused to rewind run .* to step 4"):
        train.train(dataclasses.replace(cfg, max_steps=6, init_from="resume"))
    run_id = fake.inits[0]["id"]
    assert [(i["id"], i["resume"]) for i in fake.inits[1:]] == [(None, None), (run_id, "allow")]
    assert fake.inits[1]["resume_from"] == f"{run_id}?_step=4"
    assert fake.logged[-4:] == [4, 4, 5, 6]  # the first run's val at 4, then steps 4 and 5 and the val at 6

    for refuse, match in ((("init",), "wandb could not start"), (("log",), "wandb failed to log step 0")):
        out = tmp_path / refuse[0]
        fake_wandb(refuse)
        with pytest.warns(UserWarning, match=match) as w:
            assert train.train(dataclasses.replace(cfg, out_dir=str(out)))["step"] == 4
        assert sum("wandb" in str(x.message) for x in w) == 1
        assert [r["step"] for r in read_metrics(out) if "loss" in r] == [0, 1, 2, 3]


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


def test_val_loss_scores_every_row_once_in_batches_of_one_shape(tmp_path, monkeypatch):
    """A val split of 11 rows across two shards, eval_tokens asking for more, micro_batch 4: the val loss is
    the mean token loss over exactly those 11 rows (computed here in one forward of them all), not a wrap-around
    to the first rows; and every batch the model sees has micro_batch rows (a compiled model sees one shape)."""
    from contextlib import nullcontext

    import torch.nn.functional as F

    from _shards import markov_tokens, write_dataset
    from model import GPT, GPTConfig
    from test_train import TINY

    val, more = markov_tokens(16 * 7 + 1, seed=3), markov_tokens(16 * 4 + 1, seed=4)  # 7 + 4 rows of 16 (+1)
    data = write_dataset(tmp_path / "d", {"train": [markov_tokens(2000, seed=1)], "val": [val, more]}, vocab_size=64)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    shapes = []
    forward = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, x, *a, **k: shapes.append(tuple(x.shape)) or forward(self, x, *a,
                                                                                                            **k))
    cfg = train.load_config(args(data, tmp_path, micro_batch=4, seq_len=16, total_batch_tokens=64, eval_tokens=16 * 40))
    got = train.estimate_val_loss(model, cfg, Dist(), nullcontext())
    assert shapes == [(4, 16)] * 3
    batch = torch.tensor(np.stack([val[i * 16: i * 16 + 17] for i in range(7)] + [more[i * 16: i * 16 + 17]
                                                                                 for i in range(4)]))
    with torch.no_grad():
        logits, _ = forward(model.eval(), batch[:, :-1])
    want = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)).item()
    assert got == pytest.approx(want, rel=1e-5, abs=0)
