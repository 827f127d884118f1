"""optimizer="muon": torch.optim.Muon on the blocks' matrices, AdamW on the rest (optim.muon_param_groups,
train.build_optimizer). The split; steps against torch.optim.Muon and AdamW called directly; the lr schedule on
every group; skipped non-finite steps; fp16's GradScaler; then train.py end to end: 2 processes (DDP, ZeRO-1)
against 1, bit-exact resume after a hard kill, a 2-process checkpoint resumed on 1 process.

References nobody here wrote: torch's Muon and AdamW, uninterrupted runs, single-process runs. torch's Muon
orthogonalizes in bf16, so where two runs' gradients differ by float rounding only (1 vs 2 processes sum them
in another order), a bf16 rounding flip can move a weight by ~lr/256 per step: those comparisons are to a
tolerance stated beside them, the others bit for bit."""

from __future__ import annotations

import copy
import shutil
import signal
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import common
import optim
import train
from common import Dist
from errors import UserError
from model import GPT, GPTConfig
from optim import MuonWithAdamW
from test_train import RESUME, TINY, args, ckpt, interrupted_run, metrics, run
from train_config import ConfigError, TrainConfig, load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = Dist(device=torch.device("cpu"))
MODERN = dict(pos="rope", qk_norm=True, norm="rmsnorm", mlp="relu2", tie_embeddings=False, bias=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from _shards import markov_dataset

    return markov_dataset(tmp_path_factory.mktemp("markov") / "data")


def tiny(seed: int = 0, **overrides: object) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides}))


def muon_cfg(**kw: object) -> TrainConfig:
    return TrainConfig(**{"max_steps": 1, "optimizer": "muon", **kw})


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, TINY["vocab_size"], (4, 17), generator=g)
    return x[:, :-1], x[:, 1:]


# ----------------------------------------------------------------------------------------------------
# The split and the update


@pytest.mark.parametrize("overrides", [{}, MODERN, dict(mlp="moe", n_experts=2, moe_top_k=1, tie_embeddings=False)],
                         ids=["gpt2", "modern", "moe_untied"])
def test_split_puts_every_parameter_in_one_group(overrides):
    model = tiny(**overrides)
    cfg = muon_cfg(lr=1e-3, weight_decay=0.1, muon_weight_decay=0.05, muon_lr=0.03, embed_lr=0.2, head_lr=0.004,
                   scalar_lr=0.04)
    opt = train.build_optimizer(cfg, CPU, model)
    assert isinstance(opt, MuonWithAdamW) and isinstance(opt.muon, torch.optim.Muon)
    assert type(opt.adamw) is torch.optim.AdamW
    name = {id(p): n for n, p in model.named_parameters()}  # the tied lm_head is listed once, as wte
    got = [({name[id(p)] for p in g["params"]}, g["lr"], g["weight_decay"]) for g in opt.param_groups]
    listed = [name[id(p)] for g in opt.param_groups for p in g["params"]]
    assert sorted(listed) == sorted(name.values())  # every parameter, each exactly once

    params = dict(model.named_parameters())
    untied = not model.config.tie_embeddings
    embed = {"transformer.wte.weight"} | ({"transformer.wpe.weight"} if model.config.pos == "learned" else set())
    hidden = {n for n, p in params.items() if n.startswith("transformer.h.") and p.dim() == 2}
    scalars = {n for n, p in params.items() if p.dim() == 1}
    assert all(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight", "router.weight")) for n in hidden)
    assert all(n.endswith(".bias") or "ln_" in n or "_norm" in n for n in scalars)
    expected = [(embed, 0.2 if untied else 0.004, 0.1)]  # a tied wte is also the output layer: the head's lr
    expected += [({"lm_head.weight"}, 0.004, 0.1)] if untied else []
    expected += [(scalars, 0.04, 0.0), (hidden, 0.03, 0.05)]  # no decay on 1-D tensors; Muon: its own decay
    assert got == expected
    assert all(g["lr_scale"] == g["lr"] / cfg.lr for g in opt.param_groups)


def test_adamw_groups_are_unchanged():
    """optimizer=adamw: the two decay groups of optim.param_groups, without lr_scale (the loop's lr is
    then lr_at(step) * 1.0, the same float)."""
    model = tiny()
    opt = train.build_optimizer(TrainConfig(max_steps=1), CPU, model)
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 2
    assert not any("lr_scale" in g for g in opt.param_groups)


def test_steps_equal_torch_muon_and_adamw_called_directly():
    """Three train.train_step calls against torch.optim.Muon + AdamW built by hand on a copy of the model.
    lr = min_lr = 0.5 and no warmup: lr_at is 0.5 and every lr_scale is base / 0.5, so the loop's lr is the
    base lr exactly and the two runs can agree bit for bit."""
    cfg = muon_cfg(lr=0.5, min_lr=0.5, warmup_steps=0, muon_lr=0.03, muon_momentum=0.9, muon_weight_decay=0.01,
                   embed_lr=0.1, head_lr=0.01, scalar_lr=0.05, weight_decay=0.1, beta1=0.8, eps=1e-10)
    ours = tiny(**MODERN)
    ref = copy.deepcopy(ours)
    opt = train.build_optimizer(cfg, CPU, ours)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    p = dict(ref.named_parameters())
    hidden = [p[n] for n in p if n.startswith("transformer.h.") and p[n].dim() == 2]
    scalars = [p[n] for n in p if p[n].dim() == 1]
    ref_muon = torch.optim.Muon(hidden, lr=0.03, momentum=0.9, nesterov=True, weight_decay=0.01)
    ref_adamw = torch.optim.AdamW([{"params": [p["transformer.wte.weight"]], "lr": 0.1, "weight_decay": 0.1},
                                   {"params": [p["lm_head.weight"]], "lr": 0.01, "weight_decay": 0.1},
                                   {"params": scalars, "lr": 0.05, "weight_decay": 0.0}],
                                  betas=(0.8, 0.95), eps=1e-10, fused=optim.fused_adamw_available("cpu"))
    for step in range(3):
        for g in opt.param_groups:  # what train.py's loop does
            g["lr"] = train.lr_at(step, cfg, 3) * g.get("lr_scale", 1.0)
        train.train_step(ours, opt, scaler, lambda s=step: batch(s), 1, nullcontext(), grad_clip=0.0)
        ref(*batch(step))[1].backward()
        ref_adamw.step()
        ref_muon.step()
        ref.zero_grad(set_to_none=True)
    init = tiny(**MODERN).state_dict()
    for (n, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(a, b) and not torch.equal(a, init[n]), n
    for a, b in zip(opt.muon.param_groups[0]["params"], hidden):
        assert torch.equal(opt.muon.state[a]["momentum_buffer"], ref_muon.state[b]["momentum_buffer"])


def test_non_finite_step_leaves_weights_and_state_alone(monkeypatch):
    """torch's Muon has no found_inf flag: train_step reads the finite check on the host and skips both steps."""
    model = tiny()
    opt = train.build_optimizer(muon_cfg(), CPU, model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train.train_step(model, opt, scaler, lambda: batch(0), 1, nullcontext(), grad_clip=1.0)
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    forward = GPT.forward

    def nan_forward(self, idx, targets=None, **kw):
        logits, loss, *aux = forward(self, idx, targets, **kw)
        return logits, loss * float("nan"), *aux

    monkeypatch.setattr(GPT, "forward", nan_forward)
    r = train.train_step(model, opt, scaler, lambda: batch(1), 1, nullcontext(), grad_clip=1.0)
    assert not r.finite.item()
    for k, v in before[0].items():
        assert torch.equal(model.state_dict()[k], v), k
    after = optimizer_tensors(opt.state_dict())
    assert after.keys() == optimizer_tensors(before[1]).keys()
    assert all(torch.equal(after[k], t) for k, t in optimizer_tensors(before[1]).items())


def test_fp16_grad_scaler_drives_both_optimizers():
    model = tiny()
    init = copy.deepcopy(model.state_dict())
    opt = train.build_optimizer(muon_cfg(), CPU, model)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**8)
    autocast = common.autocast_context("cpu", "fp16")
    r = train.train_step(model, opt, scaler, lambda: batch(0), 1, autocast, grad_clip=1.0)
    assert torch.isfinite(r.loss) and scaler.get_scale() == 2.0**8  # no overflow: stepped, scale kept
    for part in (opt.adamw, opt.muon):
        assert len(part.state) == sum(len(g["params"]) for g in part.param_groups)  # every tensor stepped
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, init["transformer.h.0.attn.c_attn.weight"])


def test_zero1_shards_muon_and_adamw(tmp_path):
    """Under a process group (one gloo rank here) with zero1, each part is a ZeroRedundancyOptimizer over its
    own optimizer class, with flat parameter buckets."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        opt = train.build_optimizer(muon_cfg(zero1=True), CPU, tiny())
        for part, cls in ((opt.muon, torch.optim.Muon), (opt.adamw, torch.optim.AdamW)):
            assert isinstance(part, ZeroRedundancyOptimizer) and type(part.optim) is cls
            assert part.parameters_as_bucket_view
    finally:
        dist.destroy_process_group()


def test_missing_torch_muon_is_one_line_user_error(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(UserError, match=r"torch\.optim\.Muon \(torch >= 2\.9\)") as e:
        train.build_optimizer(muon_cfg(), CPU, tiny())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv, match", [(["--optimizer=sgd"], "choose adamw or muon"),
                                         (["--muon_adjust_lr=spectral"], "original or match_rms_adamw"),
                                         (["--muon_momentum=1.0"], r"\[0, 1\)"),
                                         (["--optimizer=muon", "--lr=0", "--min_lr=0"], "lr must be positive")])
def test_bad_optimizer_settings_are_config_errors(argv, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(["--max_steps=1", *argv])
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------
# train.py


def test_schedule_scales_every_group_and_leaves_adamw_exact(data, tmp_path):
    """After a 3-step run the saved groups hold the last step's lr: AdamW's is lr_at(2) itself (==), each
    Muon-run group its base lr * lr_at(2) / lr."""
    kw = dict(max_steps=3, eval_interval=0, warmup_steps=1, min_lr=3e-4)
    cfg = load_config(args(data, tmp_path / "a", **kw))
    train.train(cfg)
    assert [g["lr"] for g in ckpt(tmp_path / "a")["optimizer"]["param_groups"]] == [train.lr_at(2, cfg, 3)] * 2
    cfg = load_config(args(data, tmp_path / "m", optimizer="muon", **kw))
    train.train(cfg)
    saved = ckpt(tmp_path / "m")["optimizer"]
    groups = saved["adamw"]["param_groups"] + saved["muon"]["param_groups"]
    bases = [cfg.head_lr, cfg.scalar_lr, cfg.muon_lr]  # TINY ties wte/lm_head: the embed group takes head_lr
    assert [g["lr"] for g in groups] == pytest.approx([b * train.lr_at(2, cfg, 3) / cfg.lr for b in bases],
                                                      rel=1e-12)


def test_resume_with_the_other_optimizer_is_a_config_error(data, tmp_path):
    train.train(load_config(args(data, tmp_path, max_steps=1, eval_interval=0)))
    with pytest.raises(ConfigError, match="optimizer state is adamw's.*resume with --optimizer=adamw"):
        train.train(load_config(args(data, tmp_path, max_steps=2, eval_interval=0, init_from="resume",
                                     optimizer="muon")))


def optimizer_tensors(state: dict) -> dict[tuple, torch.Tensor]:
    """Every tensor of a MuonWithAdamW state_dict, keyed by (part, parameter index, name)."""
    return {(part, i, k): t for part, s in state.items() for i, st in s["state"].items() for k, t in st.items()}


def assert_close_runs(ref: Path, other: Path, init: dict, frac: float) -> None:
    """Weights and optimizer tensors of two runs agree to `frac` of how far training moved each weight."""
    cr, cx = ckpt(ref), ckpt(other)
    for k, w in cr["model"].items():
        moved = (w - init[k]).abs().max().item()
        assert (cx["model"][k] - w).abs().max().item() <= frac * moved, k
    sr, sx = optimizer_tensors(cr["optimizer"]), optimizer_tensors(cx["optimizer"])
    assert sr.keys() == sx.keys()
    for key, t in sr.items():
        if t.dim():
            assert (sx[key] - t).abs().max().item() <= frac * t.abs().max().item(), key


@pytest.mark.e2e
def test_ddp_and_zero1_equal_single_process(data, tmp_path):
    """torchrun 2 x gloo, ZeRO-1 (Muon and AdamW each sharded) and plain DDP: bit for bit the same run, so the
    sharding and the consolidated checkpoint lose nothing. Against one process with grad_accum 4: the same to
    bf16 rounding (module docstring): losses to 1e-4, weights and state to 5% of how far 6 steps moved them."""
    one, zero, ddp = tmp_path / "one", tmp_path / "zero1", tmp_path / "ddp"
    run(args(data, one, optimizer="muon"))
    r = run(args(data, zero, optimizer="muon", zero1=True), nproc=2)
    run(args(data, ddp, optimizer="muon", zero1=False), nproc=2)
    assert "ZeRO-1" in r.stdout
    assert metrics(zero) == metrics(ddp)
    cz, cd = ckpt(zero), ckpt(ddp)
    assert all(torch.equal(cz["model"][k], cd["model"][k]) for k in cd["model"])
    tz, td = optimizer_tensors(cz["optimizer"]), optimizer_tensors(cd["optimizer"])
    assert tz.keys() == td.keys() and all(torch.equal(tz[k], td[k]) for k in td)
    for part in cd["optimizer"].values():  # every parameter's state made it into the checkpoint
        assert sorted(part["state"]) == list(range(sum(len(g["params"]) for g in part["param_groups"])))

    (t1, v1), (t2, v2) = metrics(one), metrics(zero)
    assert [s for s, _ in t1] == [s for s, _ in t2] == list(range(6)) and t1[-1][1] < t1[0][1] - 0.05
    assert max(abs(a - b) for (_, a), (_, b) in zip(t1 + v1, t2 + v2)) < 1e-4
    torch.manual_seed(7)  # train.py's init: seed + rank 0
    assert_close_runs(one, zero, GPT(GPTConfig(**TINY)).state_dict(), frac=0.05)


@pytest.mark.e2e
def test_resume_after_hard_kill_is_bit_identical(data, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    kw = {**RESUME, "ckpt_interval": 3, "optimizer": "muon"}
    run(args(data, ref, **kw))
    p = interrupted_run(args(data, cut, **kw), "at step 3", signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL and ckpt(cut)["step"] in (3, 6, 9)
    run(args(data, cut, init_from="resume", **kw))
    assert metrics(cut) == metrics(ref)  # every logged loss, bit for bit
    cr, cx = ckpt(ref), ckpt(cut)
    assert all(torch.equal(cr["model"][k], cx["model"][k]) for k in cr["model"])
    tr, tx = optimizer_tensors(cr["optimizer"]), optimizer_tensors(cx["optimizer"])
    assert tr.keys() == tx.keys() and all(torch.equal(tr[k], tx[k]) for k in tr)
    assert cr["optimizer"]["muon"]["param_groups"] == cx["optimizer"]["muon"]["param_groups"]


@pytest.mark.e2e
def test_zero1_checkpoint_resumes_on_one_process(data, tmp_path):
    """3 steps on 2 processes (ZeRO-1), then steps 3-5 on 1 process vs on 2: the consolidated Muon and AdamW
    state carries over (a lost momentum buffer or Adam moment would differ far beyond the bf16 tolerance)."""
    two_one, two_two = tmp_path / "21", tmp_path / "22"
    run(args(data, two_one, optimizer="muon", max_steps=3), nproc=2)
    shutil.copytree(two_one, two_two)  # the same 2-process run, resumed two ways
    run(args(data, two_one, optimizer="muon", max_steps=6, init_from="resume"))
    run(args(data, two_two, optimizer="muon", max_steps=6, init_from="resume"), nproc=2)
    (ta, va), (tb, vb) = metrics(two_one), metrics(two_two)
    assert ta[:3] == tb[:3] and [s for s, _ in ta] == list(range(6))  # the shared 2-process half, exactly
    assert max(abs(a - b) for (_, a), (_, b) in zip(ta + va, tb + vb)) < 1e-4
    torch.manual_seed(7)
    assert_close_runs(two_two, two_one, GPT(GPTConfig(**TINY)).state_dict(), frac=0.05)
