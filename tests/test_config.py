"""TrainConfig loading and validation, the LR schedule (against torch's own schedulers), weight-decay groups,
and the one-line / exit-2 errors of train.py."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _shards import markov_dataset
from conftest import hide_gpu
from errors import UserError
from model import GPT, GPTConfig
from optim import param_groups
from train import lr_at
from train_config import TrainConfig, load_config

REPO = Path(__file__).resolve().parent.parent
TINY = "{'n_layer': 1, 'n_head': 2, 'n_embd': 16, 'vocab_size': 64, 'block_size': 16}"


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("import math\nlr = 1e-3\nmax_steps = 7\nmodel_overrides = {'n_layer': 2}\n_private = 1\n")
    cfg = load_config([str(f), "--lr=2e-3", "--compile=true", "--micro_batch=4", "--model_overrides.n_head=4",
                       "--wandb_run_name=x y", "--min_lr=0"])
    assert cfg.lr == 2e-3 and cfg.max_steps == 7 and cfg.compile is True and cfg.micro_batch == 4
    assert cfg.model_overrides == {"n_layer": 2, "n_head": 4} and cfg.wandb_run_name == "x y"
    assert isinstance(cfg.min_lr, float)
    assert cfg.model_config() == GPTConfig(n_layer=2, n_head=4)


@pytest.mark.parametrize("text, argv, match", [
    ("lrr = 1e-3\n", [], "unknown key 'lrr'; did you mean lr"),
    ("max_steps = '10'\n", [], "max_steps must be int, got str"),
    ("max_steps = 1.5\n", [], "max_steps must be int"),
    ("compile = 1\n", [], "compile must be bool"),
    ("max_steps = 10\n", ["--micro_bach=3"], "unknown key; did you mean micro_batch"),
    ("max_steps = 10\n", ["--micro_batch=three"], "not a valid int"),
    ("max_steps = 10\n", ["--zero1=maybe"], "expected true/false"),
    ("max_steps = 10\nmax_tokens = 10\n", [], "exactly one of max_steps / max_tokens"),
    ("max_steps = 10\ndtype = 'fp8'\n", [], "dtype='fp8'"),
    ("max_steps = 10\nmodel_overrides = {'n_layers': 2}\n", [], "field 'n_layers'; did you mean n_layer"),
    ("max_steps = 10\nmodel_overrides = {'n_layer': '2'}\n", [], "n_layer must be int"),
    ("max_steps = 10\nseq_len = 2048\n", [], "exceeds the model's block_size=1024"),
    ("max_steps = 10\nmodel = 'gpt5'\n", [], "unknown model preset"),
    ("max_steps = 10 +\n", [], "line 1: syntax error"),
])
def test_bad_config(tmp_path, text, argv, match):
    f = tmp_path / "c.py"
    f.write_text(text)
    with pytest.raises(UserError, match=match.replace("(", r"\(").replace("[", r"\[")):
        load_config([str(f), *argv])


def test_shipped_configs():
    owt = load_config([str(REPO / "config/gpt2_owt.py")])
    fw = load_config([str(REPO / "config/gpt2_fineweb_edu.py")])
    for cfg in (owt, fw):
        assert cfg.total_batch_tokens == 524_288 and math.ceil(cfg.max_tokens / cfg.total_batch_tokens) == 19_074
        mc = cfg.model_config()
        assert (mc.n_layer, mc.n_head, mc.n_embd, mc.block_size, mc.vocab_size) == (12, 12, 768, 1024, 50257)
        for world in (1, 2, 4, 8):  # the global batch divides evenly on 1-8 GPUs
            assert cfg.total_batch_tokens % (cfg.micro_batch * cfg.seq_len * world) == 0
    assert fw.data_dir != owt.data_dir
    shk = load_config([str(REPO / "config/shakespeare_cpu.py")])
    assert shk.dtype == "fp32" and shk.max_steps > 0


def scheduler_lrs(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, n: int) -> list[float]:
    """The lr a torch scheduler gives each of the first n optimizer steps."""
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_lr_schedule_matches_torch_schedulers():
    """Our closed form against torch's LinearLR (warmup) + CosineAnnealingLR (decay to min_lr)."""
    cfg = TrainConfig(lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=50)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / cfg.warmup_steps, end_factor=1.0,
                                             total_iters=cfg.warmup_steps - 1)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.max_steps - cfg.warmup_steps, eta_min=cfg.min_lr)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[cfg.warmup_steps])
    ref = scheduler_lrs(opt, sched, cfg.max_steps + 1)
    ours = [lr_at(s, cfg, cfg.max_steps) for s in range(cfg.max_steps + 1)]
    assert ours == pytest.approx(ref, rel=1e-9)
    # the named points
    w, n = cfg.warmup_steps, cfg.max_steps
    assert lr_at(0, cfg, n) == pytest.approx(cfg.lr / w)
    assert lr_at(w - 1, cfg, n) == pytest.approx(cfg.lr)
    assert lr_at(w, cfg, n) == pytest.approx(cfg.lr)
    assert lr_at((w + n) // 2, cfg, n) == pytest.approx((cfg.lr + cfg.min_lr) / 2)
    assert lr_at(n, cfg, n) == pytest.approx(cfg.min_lr)


def test_warmdown_schedule_matches_torch_schedulers():
    """warmdown_frac: warmup, constant, then linear to min_lr over the last fraction of the steps, against torch's
    LinearLR (warmup) + ConstantLR + LinearLR (warmdown) chained by SequentialLR."""
    cfg = TrainConfig(lr=0.02, min_lr=0.0, warmup_steps=5, max_steps=60, warmdown_frac=0.25)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    decay = round(cfg.warmdown_frac * cfg.max_steps)  # 15: steps 45..59 fall, step 60 is min_lr
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / cfg.warmup_steps, end_factor=1.0,
                                             total_iters=cfg.warmup_steps - 1)
    flat = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    down = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=1e-12, total_iters=decay)
    stable = cfg.max_steps - decay - cfg.warmup_steps
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, flat, down],
                                                  milestones=[cfg.warmup_steps, cfg.warmup_steps + stable])
    ref = scheduler_lrs(opt, sched, cfg.max_steps + 1)
    ours = [lr_at(s, cfg, cfg.max_steps) for s in range(cfg.max_steps + 1)]
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert ours[cfg.max_steps - decay] == cfg.lr and ours[-1] == cfg.min_lr
    with pytest.raises(UserError, match="warmdown_frac"):
        TrainConfig(max_steps=10, warmdown_frac=1.5)


def test_weight_decay_groups():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=64, block_size=16))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}  # the tied lm_head.weight is listed once, as wte
    got_decay = {names[id(p)] for p in decay["params"]}
    got_none = {names[id(p)] for p in no_decay["params"]}
    assert got_decay == {n for n, m in model.named_modules() for n in [f"{n}.weight"]
                         if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and n != "lm_head.weight"}
    assert "transformer.wte.weight" in got_decay and "transformer.wpe.weight" in got_decay
    assert all(n.endswith(".bias") or ".ln_" in n for n in got_none)
    assert got_decay.isdisjoint(got_none) and len(got_decay) + len(got_none) == len(list(model.parameters()))


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=hide_gpu())


def assert_one_line_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


def in_process_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str
                   ) -> subprocess.CompletedProcess:
    """`python train.py ARGS` run in this process (errors.run_main around train.main, as the script's own entry
    point): its exit code, stdout and stderr."""
    import train
    from errors import run_main

    monkeypatch.setattr(sys, "argv", [str(REPO / "train.py"), *args])
    capsys.readouterr()
    try:
        run_main(train.main)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_cli_errors(tmp_path, monkeypatch, capsys):
    """Each bad command is one `error:` line and exit 2 (in-process through train.py's own entry point; the first
    case also as a real process)."""
    data = markov_dataset(tmp_path / "data", train_tokens=4000, val_tokens=2000)
    ok = [f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", f"--model_overrides={TINY}", "--max_steps=2",
          "--micro_batch=2", "--seq_len=16", "--total_batch_tokens=64", "--eval_interval=0", "--dtype=fp32",
          "--device=cpu"]
    bad_syntax = tmp_path / "bad.py"
    bad_syntax.write_text("lr = = 3\n")
    unknown = tmp_path / "unknown.py"
    unknown.write_text("learning_rate = 3e-4\n")
    cli = lambda *args: in_process_cli(monkeypatch, capsys, *args)  # noqa: E731
    assert_one_line_error(run_cli(str(tmp_path / "missing.py")), "does not exist")
    assert_one_line_error(cli(str(tmp_path / "missing.py")), "does not exist")
    assert_one_line_error(cli(str(bad_syntax)), "syntax error")
    assert_one_line_error(cli(str(unknown)), "unknown key 'learning_rate'")
    assert_one_line_error(cli(*ok, "--max_steps=two"), "--max_steps=two: not a valid int")
    assert_one_line_error(cli(*ok, f"--data_dir={tmp_path / 'nodata'}"), "does not exist")
    assert_one_line_error(cli(*ok, "--total_batch_tokens=100"), "not divisible")
    assert_one_line_error(cli(*ok, "--init_from=resume"), "ckpt.pt does not exist")
    r = cli(*ok)  # a real 2-step run writes the checkpoint the next two commands resume from
    assert r.returncode == 0, r.stderr
    assert_one_line_error(cli(*ok, "--init_from=resume", "--model_overrides.n_layer=2"), "n_layer")
    r = cli(*ok, "--init_from=resume", "--max_steps=3")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
