"""ablate.py: the sweep runner. References: train.py run directly with the same arguments (what the sweep's
numbers must equal), metrics.jsonl read independently here, and an uninterrupted sweep (for resume)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ablate
from _shards import markov_dataset
from checkpoint import load_checkpoint, model_from_checkpoint
from conftest import hide_gpu
from errors import UserError

pytestmark = pytest.mark.e2e  # whole programs: the quick loop (-m "not e2e") leaves them out

REPO = Path(__file__).resolve().parent.parent
CONFIGS = [str(REPO / "config/ablations/baseline.py"), str(REPO / "config/ablations/rope.py")]
# The real ablation configs, shrunk: a 64-token vocabulary (the Markov data's), one layer, a few steps.
TINY = ["model_overrides.vocab_size=64", "model_overrides.n_layer=1", "model_overrides.n_embd=32",
        "model_overrides.n_head=2", "micro_batch=4", "seq_len=16", "total_batch_tokens=64", "max_steps=6",
        "warmup_steps=2", "eval_interval=3", "eval_tokens=64", "log_interval=1", "device=cpu"]


def env() -> dict:  # the GPU hidden: ablate.py's HellaSwag column evaluates on CUDA where it sees one
    return hide_gpu({**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                     "WANDB_MODE": "disabled"})


def sweep_cli(*args: str, timeout: int = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "ablate.py"), *args], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [*CONFIGS, "--out-dir", str(out), "--data-dir", str(data), *[f"--set={s}" for s in TINY], *extra]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def losses(run_dir: Path) -> tuple[list, list]:
    recs = records(run_dir)
    return ([(r["step"], r["loss"]) for r in recs if "loss" in r],
            [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r])


def table(md: Path, first: str = "run") -> dict[str, dict[str, str]]:
    """results.md's table whose first column is `first` ("run": per run, "variant": seeds pooled)."""
    blocks, block = [], []
    for ln in md.read_text().splitlines() + [""]:
        if ln.startswith("|"):
            block.append([c.strip() for c in ln.strip("|").split("|")])
        elif block:
            blocks, block = blocks + [block], []
    head, _, *body = next(b for b in blocks if b[0][0] == first)
    return {row[0]: dict(zip(head, row)) for row in body}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return markov_dataset(tmp_path_factory.mktemp("abl") / "data")


@pytest.fixture(scope="module")
def swept(data, tmp_path_factory) -> Path:
    """A finished baseline + rope sweep that tests read and never write (a test that reruns ablate.py works on a
    copy). Its --out-dir is relative, as the presets' are (out/ablations_cpu), run from the folder above it: the
    runs' recorded out_dir is then "sweep/<run>", the same for a copy of the folder run from beside it."""
    cwd = tmp_path_factory.mktemp("sweep")
    r = sweep_cli(*tiny_args(data, Path("sweep")), cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    return cwd / "sweep"


def test_table_numbers_are_the_runs_metrics(swept, data, tmp_path):
    """Every cell of results.md is the run's metrics.jsonl / checkpoint, and each run equals train.py run
    by hand with the same config and overrides (same data, tokens, seed)."""
    rows, variants = table(swept / "results.md"), table(swept / "results.md", "variant")
    assert list(rows) == list(variants) == ["baseline", "rope"]
    for name in rows:
        recs, row = records(swept / name), rows[name]
        train = [r for r in recs if "loss" in r]
        final_val = [r["val_loss"] for r in recs if r.get("val_loss") is not None and r["step"] == 6]
        assert len(final_val) == 1 and train[-1]["step"] == 5
        assert row["final val loss"] == f"{final_val[0]:.4f}"
        assert row["final train loss"] == f"{train[-1]['loss']:.4f}"
        assert row["tokens/s"] == f"{statistics.median(r['tok_per_s'] for r in train if r['step'] > 0):,.0f}"
        params = model_from_checkpoint(load_checkpoint(swept / name / "ckpt.pt")).num_params()
        assert variants[name]["params"] == f"{params:,}" and row["status"] == "ok"
        assert variants[name]["final val loss"] == row["final val loss"] and variants[name]["seeds"] == "1/1"
    base = float(rows["baseline"]["final val loss"])
    assert variants["rope"]["Δ vs baseline"] == f"{float(rows['rope']['final val loss']) - base:+.4f}"
    assert variants["rope"]["verdict"] == "—"  # one seed each: no spread, no standard error
    # the reference: train.py by hand
    ref = tmp_path / "ref"
    r = subprocess.run([sys.executable, str(REPO / "train.py"), CONFIGS[1], *[f"--{s}" for s in TINY],
                        f"--data_dir={data}", f"--out_dir={ref}"], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert losses(ref) == losses(swept / "rope")  # bit for bit (fp32 on CPU)
    assert losses(swept / "rope") != losses(swept / "baseline")  # the variants really differ
    png = (swept / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_rerun_skips_finished_runs(swept, data, tmp_path):
    """The same command again (on a copy of the sweep, run from beside it as the sweep was) trains nothing and
    rewrites the same table."""
    copy = tmp_path / "sweep"
    shutil.copytree(swept, copy)  # copy2: the files keep their mtimes
    before = {p: p.stat().st_mtime_ns for p in copy.glob("*/*") if p.name in ("ckpt.pt", "metrics.jsonl")}
    old = table(copy / "results.md")
    (copy / "results.md").unlink()  # so that the table read below is the rerun's
    r = sweep_cli(*tiny_args(data, Path("sweep")), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("finished earlier, skipped") == 2 and "training" not in r.stdout
    assert before == {p: p.stat().st_mtime_ns for p in before} and len(before) == 4
    new = table(copy / "results.md")
    for name in old:
        for col in ("final train loss", "final val loss", "tokens/s"):
            assert new[name][col] == old[name][col]


def base_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [a for a in tiny_args(data, out, *extra) if a != CONFIGS[1]]  # the baseline alone


def test_changed_settings_rerun_from_scratch(swept, data, tmp_path):
    """A finished run is reused only for the same resolved TrainConfig: with another lr, the copied finished
    run is trained again from scratch (its old metrics replaced), not skipped."""
    out = tmp_path / "changed"
    shutil.copytree(swept / "baseline", out / "baseline")
    r = sweep_cli(*base_args(data, out, "--set=lr=1e-3"))
    assert r.returncode == 0 and "training" in r.stdout and "skipped" not in r.stdout, r.stdout
    new, old = losses(out / "baseline"), losses(swept / "baseline")
    assert [s for s, _ in new[0]] == [s for s, _ in old[0]] and new != old
    assert new[0][0] == old[0][0]  # step 0's loss (before any update) is the same model and batch


@pytest.mark.slow
def test_interrupted_sweep_resumes_to_the_uninterrupted_result(data, tmp_path):
    """SIGTERM to the sweep reaches the training child, which checkpoints; the same command then resumes it
    (init_from=resume) and the curves equal an uninterrupted sweep's, bit for bit."""
    long = ("--set=max_steps=1000", "--set=eval_interval=500")  # ~10 s: time to interrupt
    ref, out = tmp_path / "ref", tmp_path / "int"
    full = sweep_cli(*base_args(data, ref, *long))
    assert full.returncode == 0, full.stdout + full.stderr
    p = subprocess.Popen([sys.executable, str(REPO / "ablate.py"), *base_args(data, out, *long)], cwd=REPO,
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "baseline" / "train.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and re.search(r"step [1-9]\d*/1000", log.read_text())):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 1 and "rerun the same command" in stderr, stdout + stderr
    stopped_at = load_checkpoint(out / "baseline" / "ckpt.pt")["step"]
    assert 0 < stopped_at < 1000
    assert "stopped" in table(out / "results.md")["baseline"]["status"]
    r = sweep_cli(*base_args(data, out, *long))
    assert r.returncode == 0 and "resuming" in r.stdout, r.stdout + r.stderr
    assert losses(out / "baseline") == losses(ref / "baseline")
    assert table(out / "results.md")["baseline"]["status"] == "ok (resumed)"


@pytest.mark.slow
def test_hellaswag_column(data, tmp_path):
    """The acc_norm cell is what eval_hellaswag.py, run as its own program, reports for the final checkpoint with
    the same limit and max_length; and that checkpoint's HellaSwag scores are the trained weights' (they differ
    from the same model freshly initialised)."""
    import torch

    from conftest import shared_file
    from eval_hellaswag import evaluate_hellaswag
    from model import GPT, GPTConfig

    hs, limit = shared_file("hellaswag_val.jsonl"), 5  # (on 3 examples this model's four metrics are all 1/3)
    out = tmp_path / "hs"
    r = sweep_cli(*base_args(data, out, f"--hellaswag-limit={limit}", f"--hellaswag-data={hs}",
                             "--set=model_overrides.vocab_size=50257"))
    assert r.returncode == 0, r.stderr
    ckpt_path = out / "baseline" / "ckpt.pt"
    ckpt = load_checkpoint(ckpt_path)
    max_length = min(512, ckpt["model_config"]["block_size"])  # the protocol's 512, or what the model can see
    cli = subprocess.run([sys.executable, str(REPO / "eval_hellaswag.py"), str(ckpt_path), "--data", str(hs),
                          "--limit", str(limit), "--max-length", str(max_length), "--device", "cpu",
                          "--out", str(tmp_path / "hs.json")], cwd=REPO, env=env(), capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    want = json.loads((tmp_path / "hs.json").read_text())
    assert want["n"] == limit and want["max_length"] == max_length
    assert table(out / "results.md")["baseline"]["HellaSwag acc_norm"] == f"{want['acc_norm']:.4f}"
    # the trained weights against the same config freshly initialised (with the run's seed)
    torch.manual_seed(ckpt["train_config"]["seed"])
    fresh = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    scored = {name: evaluate_hellaswag(m, data_path=hs, limit=limit, max_length=max_length, return_examples=True)
              for name, m in (("trained", model_from_checkpoint(ckpt)), ("fresh", fresh))}
    metrics = ("acc", "acc_norm", "llmc_acc", "llmc_acc_norm")
    assert {m: scored["trained"][m] for m in metrics} == {m: want[m] for m in metrics}  # the program's numbers
    lls = {name: torch.tensor([ex["lls"] for ex in res["examples"]]) for name, res in scored.items()}
    assert (lls["trained"] - lls["fresh"]).abs().max() > 0.1, lls


def test_bad_input_on_the_command_line_is_one_line_exit_2(tmp_path):
    r = sweep_cli("config/ablations/nope_typo.py", "--out-dir", str(tmp_path), timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: config file config/ablations/nope_typo.py does not exist"], r.stderr
    r = sweep_cli(CONFIGS[0], "--set", "max_steps", "--out-dir", str(tmp_path), timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "KEY=VALUE" in r.stderr
    assert not list(tmp_path.iterdir())  # nothing trained


@pytest.mark.parametrize("args,match", [
    ([CONFIGS[0], "--set", "lrr=1"], "unknown key"),
    ([CONFIGS[0], "--data-dir", "/nonexistent/data"], "/nonexistent/data"),
    ([CONFIGS[0] + "@x"], "integer seed"),
    ([CONFIGS[0], "--set", "eval_interval=0"], "eval_interval=0"),
    ([CONFIGS[0], CONFIGS[0]], "given twice"),
    ([CONFIGS[0], "--hellaswag-limit", "2", "--hellaswag-data", "/nonexistent.jsonl"], "does not exist"),
])
def test_bad_input_is_a_user_error(args, match, data, tmp_path):
    with pytest.raises(UserError, match=match) as e:
        ablate.main([*args, *([] if "--data-dir" in args else ["--data-dir", str(data)]), "--out-dir", str(tmp_path)])
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("*/ckpt.pt"))


def test_runs_that_differ_in_budget_are_refused(data, tmp_path):
    other = tmp_path / "longer.py"
    other.write_text(f"exec(open({str(REPO / 'config/ablations/baseline.py')!r}).read())\nmax_steps = 200\n")
    with pytest.raises(UserError, match="runs differ in max_steps"):
        ablate.plan([CONFIGS[0], str(other)], tmp_path, [], None, str(data))


def test_preset_is_every_ablation_config_plus_a_second_baseline_seed():
    configs, out = ablate.preset_configs("cpu")
    files = sorted(p.stem for p in (REPO / "config/ablations").glob("*.py"))
    assert Path(configs[0]).stem == "baseline" and [c for c in configs if "@" in c] == [
        os.path.relpath(REPO / "config/ablations/baseline.py") + "@1338"]
    assert sorted(Path(c.split("@")[0]).stem for c in configs if "@" not in c) == files
    assert out == Path("out/ablations_cpu")


def test_runs_from_before_a_new_train_option_still_count_as_finished():
    """A field added to TrainConfig after a run was saved matches only while it stays at its default."""
    from dataclasses import asdict

    import train_config

    wanted = asdict(train_config.load_config([CONFIGS[0]]))
    saved = {k: v for k, v in wanted.items() if k != "hellaswag_limit"}  # as if the field were new
    assert ablate.same_config(saved, wanted)
    assert not ablate.same_config(saved, {**wanted, "hellaswag_limit": 7})
    assert not ablate.same_config({**wanted, "lr": 1.0}, wanted)
    assert ablate.same_config({**wanted, "init_from": "scratch"}, {**wanted, "init_from": "resume"})


# ---- seeds pooled per variant: the statistics on hand-made numbers, then a real --jobs 2 sweep

def test_mean_std_and_the_standard_error_of_a_difference():
    import numpy as np

    a, b = [5.0, 5.2, 5.6], [5.5, 5.9]
    mean, std = ablate.mean_std(a)
    assert mean == pytest.approx(np.mean(a)) and std == pytest.approx(np.std(a, ddof=1))
    assert ablate.mean_std([5.0]) == (5.0, None)
    want = math.sqrt(np.var(a, ddof=1) / 3 + np.var(b, ddof=1) / 2)  # Welch's SE of mean(a) - mean(b)
    assert ablate.diff_se(a, b) == pytest.approx(want) and ablate.diff_se(b, a) == pytest.approx(want)
    assert ablate.diff_se(a, [5.5]) is None and ablate.diff_se([5.0], b) is None
    assert ablate.diff_se([1.0, 1.0], [2.0, 2.0]) == 0.0


def test_tokens_to_reach_interpolates_at_the_first_crossing():
    import numpy as np

    curve = [(0, 10.0), (100, 8.0), (200, 6.0), (300, 5.0), (400, 5.5), (500, 4.0)]
    assert ablate.tokens_to_reach(curve, 7.0) == pytest.approx(150.0)  # halfway from 8.0 @ 100 to 6.0 @ 200
    assert ablate.tokens_to_reach(curve, 5.2) == pytest.approx(np.interp(5.2, [5.0, 6.0], [300, 200]))
    assert ablate.tokens_to_reach(curve, 5.0) == 300  # exactly on an evaluation
    assert ablate.tokens_to_reach(curve, 4.5) == pytest.approx(500 - 0.5 / 1.5 * 100)  # after the bump up
    assert ablate.tokens_to_reach(curve, 11.0) == 0
    assert ablate.tokens_to_reach(curve, 3.9) is None


def test_token_efficiency_is_the_mean_over_seeds_of_tokens_to_the_target():
    fast = [(0, 10.0), (100, 6.0), (200, 5.0)]  # reaches 6.0 at 100
    slow = [(0, 10.0), (100, 7.0), (200, 5.0)]  # reaches 6.0 at 150
    never = [(0, 10.0), (100, 8.0), (200, 7.0)]
    assert ablate.token_efficiency([fast, slow], 6.0, 200) == (pytest.approx(125 / 200), 2)
    assert ablate.token_efficiency([fast, never], 6.0, 200) == (None, 1)  # "not reached (1/2 seeds did)"
    assert ablate.token_efficiency([never], 6.0, 200) == (None, 0)
    assert ablate.mean_curve([fast, slow]) == [(0, 10.0), (100, 6.5), (200, 5.0)]
    assert ablate.mean_curve([fast, slow[:2]]) == [(0, 10.0), (100, 6.5)]  # evaluations both seeds have


def test_token_efficiency_se_by_the_delta_method():
    """The seeds' spread of tokens-to-target and the target's standard error times d(tokens)/d(target), the
    derivative taken numerically here (a central difference of tokens_to_reach), not from the segment formula."""
    curves = [[(0, 10.0), (100, 7.0), (200, 5.0)], [(0, 10.0), (100, 6.5), (200, 5.5)],
              [(0, 10.0), (100, 8.0), (200, 5.8)]]
    target, target_se, h = 6.0, 0.05, 1e-4
    tokens = [ablate.tokens_to_reach(c, target) for c in curves]
    slope = statistics.mean((ablate.tokens_to_reach(c, target - h) - ablate.tokens_to_reach(c, target + h)) / (2 * h)
                            for c in curves)
    want = math.sqrt(statistics.variance(tokens) / 3 + (slope * target_se) ** 2) / 200
    assert ablate.token_efficiency_se(curves, target, target_se, 200) == pytest.approx(want, rel=1e-6)
    assert ablate.token_efficiency_se(curves[:1], target, target_se, 200) is None  # one seed: no spread
    assert ablate.token_efficiency_se(curves, target, None, 200) is None  # the baseline had one seed
    assert ablate.token_efficiency_se([*curves, [(0, 10.0), (200, 7.0)]], target, target_se, 200) is None


def test_variant_stats_against_the_baselines_mean():
    def run(final: float) -> dict:
        return {"val_loss": final, "val_curve": [(0, 10.0), (100, 8.0), (200, final)]}

    groups = {"baseline": [run(6.0), run(6.2), run(6.4)], "better": [run(5.0), run(5.2)],
              "worse": [run(6.9), run(7.1)], "single": [run(6.1)], "unfinished": []}
    st = ablate.variant_stats(groups, 200)
    assert st["baseline"]["mean"] == pytest.approx(6.2) and st["baseline"]["diff"] == pytest.approx(0)
    assert st["better"]["diff"] == pytest.approx(-1.1)
    assert st["better"]["se"] == pytest.approx(math.sqrt(0.04 / 3 + 0.02 / 2))
    # each "better" seed crosses 6.2 between (100, 8.0) and (200, final): 100 + 1.8 / (8 - final) * 100
    want = statistics.mean(100 + 1.8 / (8 - f) * 100 for f in (5.0, 5.2)) / 200
    assert st["better"]["efficiency"] == pytest.approx(want) and st["better"]["reached"] == 2
    tokens, slope = [100 + 1.8 / (8 - f) * 100 for f in (5.0, 5.2)], statistics.mean(100 / (8 - f) for f in (5.0, 5.2))
    want_se = math.sqrt(statistics.variance(tokens) / 2 + (slope * 0.2 / math.sqrt(3)) ** 2) / 200
    assert st["better"]["efficiency_se"] == pytest.approx(want_se)
    assert ablate._efficiency_cell("better", st["better"], False) == f"{want:.2f} ± {want_se:.2f}"
    assert st["worse"]["efficiency"] is None and st["worse"]["reached"] == 0
    assert st["single"]["std"] is None and st["single"]["se"] is None and st["single"]["reached"] == 1
    assert st["unfinished"] == {"n": 0}
    assert ablate._verdict(st["better"]).startswith("better") and ablate._verdict(st["single"]) == "—"
    assert ablate._verdict({"diff": 0.01, "se": 0.01}).startswith("within noise")


LEARN = REPO / "config/ablations_learn"
MUON = {"optimizer": "muon", "beta1": 0.8, "eps": 1e-10, "weight_decay": 0.0,
        "embed_lr": pytest.approx(0.2 * 6 ** 0.5), "head_lr": pytest.approx(0.004 * 6 ** 0.5)}  # (128/768)^-0.5
# What each learn-preset config changes from its baseline: GPTConfig fields as model.<field>, TrainConfig fields
INTENDED = {
    "rope": {"model.pos": "rope"}, "qk_norm": {"model.qk_norm": True}, "rmsnorm": {"model.norm": "rmsnorm"},
    "relu2": {"model.mlp": "relu2"}, "swiglu": {"model.mlp": "swiglu"}, "untied": {"model.tie_embeddings": False},
    "no_bias": {"model.bias": False}, "post_norm": {"model.norm_placement": "post"},
    "sandwich_norm": {"model.norm_placement": "sandwich"}, "doc_mask": {"model.doc_mask": True},
    "moe": {"model.mlp": "moe", "model.n_experts": 4},  # moe_top_k=2 is the default
    "muon": MUON,
    "modern": {**MUON, "model.pos": "rope", "model.qk_norm": True, "model.norm": "rmsnorm", "model.mlp": "relu2",
               "model.tie_embeddings": False, "model.bias": False},
}


def resolved(path: Path) -> dict:
    from dataclasses import asdict

    import train_config

    cfg = train_config.load_config([str(path)])
    flat = {k: v for k, v in asdict(cfg).items() if k not in ("model_overrides", "out_dir")}
    return {**flat, **{f"model.{k}": v for k, v in asdict(cfg.model_config()).items()}}


def test_learn_preset_configs_differ_from_the_baseline_in_the_intended_keys_only():
    assert sorted(p.stem for p in LEARN.glob("*.py")) == sorted([*INTENDED, "baseline"])
    base = resolved(LEARN / "baseline.py")
    quickstart = resolved(REPO / "config/shakespeare_cpu.py")  # the quickstart's model, as the config says
    assert {k: v for k, v in base.items() if k.startswith("model.")} == {
        k: v for k, v in quickstart.items() if k.startswith("model.")}
    for name, want in INTENDED.items():
        cfg = resolved(LEARN / f"{name}.py")
        assert {k: v for k, v in cfg.items() if v != base[k]} == want, name


def test_learn_preset_runs_every_variant_with_its_seeds_headline_ones_first():
    configs, out = ablate.preset_configs("learn")
    assert out == Path("out/ablations_learn")
    seeds: dict[str, list[str]] = {}
    for c in configs:
        path, _, seed = c.partition("@")
        assert Path(path).resolve().parent == LEARN
        seeds.setdefault(Path(path).stem, []).append(seed)
    three = {"baseline", "modern", "muon", "doc_mask"}
    assert seeds == {v: ["", "1338", "1339"] if v in three else ["", "1338"] for v in [*INTENDED, "baseline"]}
    assert len(configs) == 32
    # the 3-seed variants first, all their seeds; then every other variant once before any twice
    assert [Path(c.split("@")[0]).stem for c in configs[:12]] == [v for v in ("baseline", "modern", "muon",
                                                                              "doc_mask") for _ in range(3)]
    assert all("@" not in c for c in configs[12:22]) and all(c.endswith("@1338") for c in configs[22:])


def first_crossing(curve: list[tuple[float, float]], target: float) -> float | None:
    """Tokens at which the val loss first gets down to target: the first evaluation at or below it, or np.interp
    on the segment from the evaluation before it (loss falling from above target); None if none gets there."""
    import numpy as np

    for i, (tokens, loss) in enumerate(curve):
        if loss <= target:
            if i == 0:
                return float(tokens)
            (t_prev, l_prev) = curve[i - 1]
            return float(np.interp(target, [loss, l_prev], [tokens, t_prev]))
    return None


def test_parallel_sweep_equals_the_sequential_one_and_pools_seeds(swept, data, tmp_path):
    """--jobs 2 trains the same runs as one at a time (bit for bit), and the variant table is the seeds'
    statistics computed here from each run's metrics.jsonl."""
    import numpy as np

    out = tmp_path / "par"
    specs = [CONFIGS[0], CONFIGS[0] + "@1338", CONFIGS[1], CONFIGS[1] + "@1338"]
    r = sweep_cli(*specs, "--jobs", "2", "--out-dir", str(out), "--data-dir", str(data),
                  *[f"--set={s}" for s in TINY])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 at a time" in r.stdout
    for name in ("baseline", "rope"):
        assert losses(out / name) == losses(swept / name)
    assert losses(out / "baseline_seed1338") != losses(out / "baseline")
    final = {n: [r["val_loss"] for r in records(out / n) if "val_loss" in r][-1] for n in
             ("baseline", "baseline_seed1338", "rope", "rope_seed1338")}
    b, v = [final["baseline"], final["baseline_seed1338"]], [final["rope"], final["rope_seed1338"]]
    rows = table(out / "results.md", "variant")
    assert list(rows) == ["baseline", "rope"] and rows["rope"]["seeds"] == "2/2"
    assert rows["baseline"]["final val loss"] == f"{np.mean(b):.4f} ± {np.std(b, ddof=1):.4f}"
    se = math.sqrt(np.var(v, ddof=1) / 2 + np.var(b, ddof=1) / 2)
    assert rows["rope"]["Δ vs baseline"] == f"{np.mean(v) - np.mean(b):+.4f} ± {se:.4f}"
    curves = [[(r["tokens"], r["val_loss"]) for r in records(out / n) if "val_loss" in r]
              for n in ("rope", "rope_seed1338")]
    reach = [first_crossing(c, float(np.mean(b))) for c in curves]
    want = "not reached" if None in reach else f"{np.mean(reach) / (6 * 64):.2f}"  # 6 steps x 64 tokens
    assert rows["rope"]["token efficiency"].startswith(want)
    assert set(table(out / "results.md")) == set(final)
