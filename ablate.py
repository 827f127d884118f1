"""Run architecture ablations: several train.py configs on the same data, tokens and seed, then a results
table (OUT/results.md) and validation-loss curves (OUT/results.png).

    python ablate.py --preset cpu                                    # config/ablations/*.py -> out/ablations_cpu/
    python ablate.py --preset learn --jobs 2                         # config/ablations_learn/*.py, 2-3 seeds each
    python ablate.py config/ablations/baseline.py config/ablations/rope.py --out-dir out/abl
    python ablate.py config/ablations/baseline.py@1338 ...           # CONFIG@SEED: the same config, another seed
    python ablate.py --preset cpu --set max_steps=20                 # train.py --key=value for every run
    python ablate.py --preset cpu --hellaswag-limit 500 --hellaswag-data <mirror>/hellaswag_val.jsonl

Each run is its own process, `python train.py CONFIG [--key=value ...] --out_dir=OUT/NAME [--seed=S]`, and
every number in the table is read back from OUT/NAME/metrics.jsonl (and ckpt.pt for HellaSwag). Runs of one
config file are one variant: the table gives its mean ± std over seeds, the difference from the first config's
mean with its standard error, and its token efficiency (the tokens it needs to reach the baseline's mean final
val loss, over the baseline's tokens). A preset runs each config with its own seed plus extra seeds (EXTRA_SEEDS).

Skip / resume: a run whose OUT/NAME/ablate.json records the same resolved TrainConfig, and whose metrics.jsonl
has the final val loss, is not run again; a run stopped after a checkpoint (Ctrl-C, SIGTERM) continues with
init_from=resume. So an interrupted sweep is finished by running the same command again.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import plot
from errors import ArgumentParser, UserError, run_main

REPO = Path(__file__).resolve().parent
EXTRA_SEEDS = (1338, 1339, 1340, 1341)  # a preset's 2nd, 3rd, ... seed of a config (the 1st is the config's own)


@dataclass(frozen=True)
class Preset:
    folder: str  # every *.py in it is one variant; baseline.py is the reference
    out_dir: str
    seeds: int = 1  # seeds per variant
    more_seeds: dict[str, int] = field(default_factory=dict)  # variant -> seeds, where it differs from `seeds`


PRESETS = {
    "cpu": Preset("config/ablations", "out/ablations_cpu", 1, {"baseline": 2}),
    # 3 seeds where the comparison matters most (the reference, the recipe, its optimizer, the one data change)
    "learn": Preset("config/ablations_learn", "out/ablations_learn", 2,
                    {"baseline": 3, "modern": 3, "muon": 3, "doc_mask": 3}),
}
# Fields that must agree across runs for the comparison to mean anything (seed may differ only via @SEED).
SAME_FOR_ALL = ("data_dir", "max_steps", "max_tokens", "total_batch_tokens", "seq_len", "eval_interval",
                "eval_tokens")


@dataclass
class Run:
    name: str  # folder under the sweep's out dir and the table's row label
    config: Path
    argv: list[str]  # train.py's arguments (after the script path)
    cfg: object  # train_config.TrainConfig, resolved from argv exactly as train.py will resolve it
    params: int
    max_steps: int

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)


def _done_marker(run: Run) -> Path:
    return run.out_dir / "ablate.json"


def read_metrics(run_dir: Path) -> list[dict]:
    """plot.py's reader, but a run that has not logged yet has no records instead of being an error."""
    return plot.read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []


def summarize(records: list[dict], max_steps: int) -> dict:
    """The table's numbers from one run's metrics.jsonl records: the last logged train loss, the val loss at
    the final step, and the median tokens/s over logged steps after the first (step 0 includes warm-up)."""
    train = [r for r in records if r.get("loss") is not None]
    val = [r for r in records if r.get("val_loss") is not None]
    speeds = [r["tok_per_s"] for r in train if r["step"] > 0 and r.get("tok_per_s")]
    final_val = [r for r in val if r["step"] == max_steps]
    return {
        "train_loss": train[-1]["loss"] if train else None,
        "train_step": train[-1]["step"] if train else None,
        "val_loss": final_val[-1]["val_loss"] if final_val else None,
        "tok_per_s": statistics.median(speeds) if speeds else None,
        "val_curve": [(r["tokens"], r["val_loss"]) for r in val],
    }


def plan(configs: list[str], out_dir: Path, sets: list[str], seed: int | None, data_dir: str | None) -> list[Run]:
    """Resolve every CONFIG[@SEED] into a Run, checking configs, data and comparability before any training."""
    import train_config
    from data import load_meta
    from model import GPT

    if not configs:
        raise UserError("no configs given; pass config files (e.g. config/ablations/*.py) or --preset cpu")
    runs: list[Run] = []
    params: dict[str, int] = {}  # by model config: seeds of one config build its model once
    for spec in configs:
        path_text, _, seed_text = spec.partition("@")
        path = Path(path_text)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        run_seed = seed
        if seed_text:
            try:
                run_seed = int(seed_text)
            except ValueError:
                raise UserError(f"{spec}: the part after @ must be an integer seed") from None
        name = path.stem + (f"_seed{run_seed}" if seed_text else "")
        argv = [str(path), *[f"--{s}" for s in sets]]
        if data_dir is not None:
            argv.append(f"--data_dir={data_dir}")
        if run_seed is not None:
            argv.append(f"--seed={run_seed}")
        argv.append(f"--out_dir={out_dir / name}")
        cfg = train_config.load_config(argv)
        if not cfg.eval_interval:
            raise UserError(f"{spec}: eval_interval=0 gives no val loss; set it > 0 (--set eval_interval=N)")
        max_steps = cfg.max_steps or math.ceil(cfg.max_tokens / cfg.total_batch_tokens)
        key = repr(cfg.model_config())
        params[key] = params.get(key) or GPT(cfg.model_config()).num_params()
        runs.append(Run(name, path, argv, cfg, params[key], max_steps))
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"run name(s) {dupes} given twice; use CONFIG@SEED for a second seed of one config")
    for key in SAME_FOR_ALL:
        values = {r.name: getattr(r.cfg, key) for r in runs}
        if len(set(map(repr, values.values()))) > 1:
            raise UserError(f"runs differ in {key} ({values}): ablations must share data and token budget; "
                            f"align them with --set {key}=...")
    load_meta(runs[0].cfg.data_dir)  # missing data: one clear line now, not 13 failed runs later
    return runs


def same_config(saved: dict, wanted: dict) -> bool:
    """Whether a run recorded with TrainConfig `saved` is the run `wanted` asks for. A field that did not exist
    when it was saved counts as equal when `wanted` leaves it at its default (new train.py options do not
    invalidate finished runs); init_from and overwrite are how a run starts, not what it is."""
    import train_config

    defaults = train_config.defaults()
    return all(saved[k] == v if k in saved else v == defaults.get(k)
               for k, v in wanted.items() if k not in ("init_from", "overwrite"))


def run_state(run: Run) -> str:
    """'done' (finished with this exact config), 'resume' (a checkpoint of this config, not finished) or
    'fresh' (nothing usable: train from scratch, which also clears an old metrics.jsonl)."""
    from checkpoint import load_checkpoint

    wanted = asdict(run.cfg)
    final_val = summarize(read_metrics(run.out_dir), run.max_steps)["val_loss"] is not None
    marker = _done_marker(run)
    if marker.is_file() and same_config(json.loads(marker.read_text()).get("config", {}), wanted) and final_val:
        return "done"
    ckpt_path = run.out_dir / "ckpt.pt"
    if ckpt_path.is_file():
        try:
            ckpt = load_checkpoint(ckpt_path)
        except UserError:
            return "fresh"
        if same_config(ckpt.get("train_config", {}), wanted):
            return "done" if ckpt["step"] >= run.max_steps and final_val else "resume"
    return "fresh"


class _Signals:
    """While a child trains: Ctrl-C reaches it directly (same process group), so the sweep only notes it and
    waits for the child's checkpoint; SIGTERM sent to the sweep is forwarded to the child."""

    def __init__(self) -> None:
        self.children: set[subprocess.Popen] = set()  # one per --jobs worker
        self.stop = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, frame: object) -> None:
        self.stop = True
        for child in list(self.children) if signum == signal.SIGTERM else []:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def close(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def train_run(run: Run, state: str, threads: int | None, sig: _Signals) -> tuple[int, float, str]:
    """Run train.py for one config; returns (exit code, wall seconds, last stderr line)."""
    argv = [sys.executable, str(REPO / "train.py"), *run.argv]
    if state == "resume":
        argv.append("--init_from=resume")
    else:  # the sweep owns its run folders: a stale run of another config is replaced
        argv.append("--overwrite=true")
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run.out_dir / "train.log", "a") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        # the caller's cwd, as if they ran train.py themselves: relative paths in configs mean the same here
        child = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.PIPE, text=True)
        sig.children.add(child)
        _, err = child.communicate()
        log.write(err)
    rc = child.returncode
    sig.children.discard(child)
    last = next((ln for ln in reversed(err.splitlines()) if ln.strip()), "")
    return rc, time.perf_counter() - t0, last


def hellaswag(run: Run, data_path: str | None, limit: int) -> float:
    import torch

    from checkpoint import load_checkpoint, model_from_checkpoint
    from eval_hellaswag import evaluate_hellaswag

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model_from_checkpoint(load_checkpoint(run.out_dir / "ckpt.pt")).to(device).eval()
    max_length = min(512, model.config.block_size)  # the evaluation protocol's 512, or what the model can see
    return evaluate_hellaswag(model, data_path=data_path, limit=limit or None, max_length=max_length,
                              device=device)["acc_norm"]


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


# ---- statistics over seeds (pure functions of the runs' numbers; tests/test_ablate.py checks them by hand)

def mean_std(xs: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for a single value)."""
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def diff_se(a: list[float], b: list[float]) -> float | None:
    """Standard error of mean(a) - mean(b) without assuming equal variances (Welch's): sqrt(sa²/na + sb²/nb).
    None when either side has one value (its spread is unknown)."""
    if len(a) < 2 or len(b) < 2:
        return None
    return math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))


def crossing(curve: list[tuple[float, float]], target: float) -> tuple[float, float] | None:
    """Where a (tokens, val loss) curve first gets down to `target`: (tokens, linearly interpolated between the two
    evaluations around the crossing; the segment's slope in tokens per nat, 0 at the first evaluation); None if
    it never does."""
    for i, (tokens, loss) in enumerate(curve):
        if loss <= target:
            if i == 0:
                return tokens, 0.0
            t0, l0 = curve[i - 1]
            return t0 + (l0 - target) / (l0 - loss) * (tokens - t0), (tokens - t0) / (l0 - loss)
    return None


def tokens_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Tokens at which a (tokens, val loss) curve first gets down to `target` (see crossing); None if never."""
    c = crossing(curve, target)
    return c[0] if c else None


def token_efficiency(curves: list[list[tuple[float, float]]], target: float,
                     ref_tokens: float) -> tuple[float | None, int]:
    """Mean over seeds of tokens_to_reach(curve, target) / ref_tokens, and how many seeds reach the target
    (the mean is None unless all do: a seed that never gets there has no token count to average)."""
    reached = [t for t in (tokens_to_reach(c, target) for c in curves) if t is not None]
    mean = statistics.mean(reached) / ref_tokens if curves and len(reached) == len(curves) else None
    return mean, len(reached)


def token_efficiency_se(curves: list[list[tuple[float, float]]], target: float, target_se: float | None,
                        ref_tokens: float) -> float | None:
    """Standard error of token_efficiency: the seeds' spread of tokens-to-target (std / sqrt(n)) and the target's
    own (the baseline's mean final loss, standard error target_se) carried through the curves' mean slope at
    the crossing (tokens per nat: the delta method), added in quadrature. None with fewer than 2 seeds on
    either side, or a seed that never reaches the target."""
    points = [crossing(c, target) for c in curves]
    if len(points) < 2 or None in points or target_se is None:
        return None
    tokens, slopes = zip(*points)
    var = statistics.variance(tokens) / len(tokens) + (statistics.mean(slopes) * target_se) ** 2
    return math.sqrt(var) / ref_tokens


def mean_curve(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """Pointwise mean over seeds at the evaluations every seed has (the same steps: one eval_interval)."""
    common = set.intersection(*(set(t for t, _ in c) for c in curves)) if curves else set()
    return [(t, statistics.mean(dict(c)[t] for c in curves)) for t in sorted(common)]


def variant_stats(groups: dict[str, list[dict]], ref_tokens: float) -> dict[str, dict]:
    """Per variant (name -> its finished runs' summaries, the first variant = the baseline): n, mean/std of
    final val loss, difference from the baseline's mean ± its standard error, token efficiency."""
    names = list(groups)
    base = [r["val_loss"] for r in groups[names[0]]]
    target = statistics.mean(base) if base else None
    out = {}
    for name in names:
        vals = [r["val_loss"] for r in groups[name]]
        if not vals:
            out[name] = {"n": 0}
            continue
        mean, std = mean_std(vals)
        st = {"n": len(vals), "mean": mean, "std": std, "diff": mean - target if target is not None else None,
              "se": diff_se(vals, base) if name != names[0] else None}
        if target is not None and name != names[0]:
            curves = [r["val_curve"] for r in groups[name]]
            st["efficiency"], st["reached"] = token_efficiency(curves, target, ref_tokens)
            target_se = statistics.stdev(base) / math.sqrt(len(base)) if len(base) > 1 else None
            st["efficiency_se"] = token_efficiency_se(curves, target, target_se, ref_tokens)
        out[name] = st
    return out


def _efficiency_cell(name: str, st: dict, is_base: bool) -> str:
    if is_base:
        return "1 (reference)"
    if not st.get("n"):
        return "—"
    if st.get("efficiency") is None:
        return "not reached" + (f" ({st['reached']}/{st['n']} seeds did)" if st.get("reached") else "")
    se = st.get("efficiency_se")
    return f"{st['efficiency']:.2f}" + (f" ± {se:.2f}" if se is not None else "")


def _verdict(st: dict) -> str:
    if st.get("se") is None or st.get("diff") is None:
        return "—"
    z = abs(st["diff"]) / st["se"] if st["se"] > 0 else math.inf
    word = ("better" if st["diff"] < 0 else "worse") if z > 2 else "within noise"
    return f"{word} ({z:.1f} SE)"


def write_results(runs: list[Run], rows: dict[str, dict], out_dir: Path, command: str,
                  with_hellaswag: bool, sweep_s: float | None = None) -> tuple[Path, Path]:
    """results.md (per variant: seeds pooled, the first config = the baseline; then per run) and results.png
    (mean val loss over seeds vs tokens, one line per variant)."""
    import torch

    cfg0 = runs[0].cfg
    ref_tokens = runs[0].max_steps * cfg0.total_batch_tokens
    variants: dict[str, list[Run]] = {}
    for run in runs:
        variants.setdefault(run.config.stem, []).append(run)
    finished = {v: [rows[r.name] for r in rs if rows.get(r.name, {}).get("val_loss") is not None]
                for v, rs in variants.items()}
    stats = variant_stats(finished, ref_tokens)
    base_name = runs[0].config.stem
    lines = [
        "# Ablation results",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {platform.system()}, Python {platform.python_version()}, torch {torch.__version__}.  ",
        f"Every run: data `{cfg0.data_dir}`, {runs[0].max_steps} steps x {cfg0.total_batch_tokens:,} tokens "
        f"= {ref_tokens:,} tokens, val loss over the first {cfg0.eval_tokens:,} val tokens (the same rows for "
        f"every run) every {cfg0.eval_interval} steps." +
        (f"  \nThis invocation: {sweep_s:.0f} s wall." if sweep_s is not None else ""),
        "",
        f"Per variant, over its seeds: final val loss mean ± std (sample std, n - 1); Δ = mean - {base_name}'s "
        f"mean ± the standard error of that difference (Welch: sqrt(s1²/n1 + s2²/n2)); verdict: better / worse "
        f"when |Δ| > 2 SE, else within noise (with 2-3 seeds an SE is itself rough: read 2-3 SE as a hint); "
        f"token efficiency = the tokens the variant needs to reach {base_name}'s mean final val loss (linear "
        f"interpolation between evaluations, per seed, averaged) / {ref_tokens:,} (< 1: fewer tokens), ± its "
        "standard error where both sides have 2+ seeds (the seeds' spread of those tokens and the target's own "
        "standard error times the curves' slope at the crossing, in quadrature).",
        "",
        "| variant | seeds | params | final val loss | Δ vs " + base_name + " | verdict | token efficiency | "
        "tokens/s |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for v, rs in variants.items():
        st = stats[v]
        speeds = [rows[r.name]["tok_per_s"] for r in rs if rows.get(r.name, {}).get("tok_per_s")]
        loss = "—" if not st["n"] else f"{st['mean']:.4f}" + (f" ± {st['std']:.4f}" if st["std"] is not None else "")
        diff = "—" if st.get("diff") is None or v == base_name else (
            f"{st['diff']:+.4f}" + (f" ± {st['se']:.4f}" if st["se"] is not None else ""))
        lines.append(f"| {v} | {st['n']}/{len(rs)} | {rs[0].params:,} | {loss} | {diff} | "
                     f"{'—' if v == base_name else _verdict(st)} | {_efficiency_cell(v, st, v == base_name)} | "
                     f"{_fmt(statistics.median(speeds) if speeds else None, ',.0f')} |")
    head = ["run", "seed", "final train loss", "final val loss", "tokens/s"]
    if with_hellaswag:
        head.append("HellaSwag acc_norm")
    head += ["wall s", "status"]
    lines += [
        "",
        "Per run: final train loss = the last logged step's batch loss (one batch: noisy); tokens/s = median over "
        "logged steps after step 0 (evaluation excluded); wall s = the train.py process, start-up and "
        "evaluation included.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if h in ("run", "status") else "---:" for h in head) + "|",
    ]
    for run in (r for rs in variants.values() for r in rs):
        r = rows.get(run.name, {})
        cells = [run.name, str(run.cfg.seed), _fmt(r.get("train_loss"), ".4f"), _fmt(r.get("val_loss"), ".4f"),
                 _fmt(r.get("tok_per_s"), ",.0f")]
        if with_hellaswag:
            cells.append(_fmt(r.get("hellaswag_acc_norm"), ".4f"))
        cells += [_fmt(r.get("wall_s"), ".0f"), r.get("status", "not run")]
        lines.append("| " + " | ".join(cells) + " |")
    md = out_dir / "results.md"
    md.write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    colors = plt.get_cmap("tab20").colors  # 20 distinct colors; dashes tell the second ten apart
    target = stats[base_name].get("mean")
    for i, v in enumerate(variants):
        curve = mean_curve([rows[r.name]["val_curve"] for r in variants[v]
                            if rows.get(r.name, {}).get("val_loss") is not None])
        style = dict(marker="o", ms=3, color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
                     ls="-" if i < 10 else "--", lw=2.5 if i == 0 else 1.2, label=f"{v} (n={stats[v]['n']})")
        for ax, pts in ((axes[0], curve), (axes[1], curve[len(curve) // 2:])):
            if pts:
                ax.plot(*zip(*pts), **style)
    for ax, title in zip(axes, ("val loss, mean over seeds", "second half (zoom)")):
        if target is not None:
            ax.axhline(target, color="gray", lw=0.8, ls=":")  # the level token efficiency is measured at
        ax.set_title(title)
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
    if any(ax.lines for ax in axes):
        axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    png = out_dir / "results.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return md, png


def _sweep_one(i: int, runs: list[Run], threads: int | None, sig: _Signals, hellaswag_data: str | None,
               hellaswag_limit: int | None) -> dict | None:
    """Train (or skip / resume) runs[i]; its table row, or None when not started (the sweep is stopping)."""
    run, with_hs = runs[i], hellaswag_limit is not None
    if sig.stop:
        return None
    state = run_state(run)
    marker = _done_marker(run)
    info = json.loads(marker.read_text()) if state == "done" and marker.is_file() else {}
    if state == "done":
        print(f"[{i + 1}/{len(runs)}] {run.name}: finished earlier, skipped", flush=True)
        row = {"status": "ok (earlier run)", "wall_s": info.get("wall_s")}
    else:
        print(f"[{i + 1}/{len(runs)}] {run.name}: {'resuming' if state == 'resume' else 'training'} "
              f"({run.out_dir / 'train.log'})", flush=True)
        rc, wall, last = train_run(run, state, threads, sig)
        if rc != 0:
            print(f"  {run.name}: train.py exited {rc}: {last}", flush=True)
            return {**summarize(read_metrics(run.out_dir), run.max_steps),
                    "status": f"failed (exit {rc}): {last[:80]}", "wall_s": wall}
        row = {"status": "ok" if state == "fresh" else "ok (resumed)", "wall_s": wall}
    row.update(summarize(read_metrics(run.out_dir), run.max_steps))
    if row["val_loss"] is None:  # exited 0 without its final step: stopped by a signal
        row["status"] = "stopped (rerun the command to resume)"
        sig.stop = True
        return row
    info = {**info, "config": asdict(run.cfg), "wall_s": row["wall_s"]}
    marker.write_text(json.dumps(info, indent=1))  # training is done even if HellaSwag fails below
    if with_hs:
        key = f"{hellaswag_data}|{hellaswag_limit}"
        if info.get("hellaswag_key") != key:
            info["hellaswag_acc_norm"] = hellaswag(run, hellaswag_data, hellaswag_limit)
            info["hellaswag_key"] = key
        row["hellaswag_acc_norm"] = info["hellaswag_acc_norm"]
    marker.write_text(json.dumps(info, indent=1))
    print(f"  {run.name}: val {row['val_loss']:.4f} | train {row['train_loss']:.4f} | "
          f"{_fmt(row['tok_per_s'], ',.0f')} tok/s" +
          (f" | hellaswag acc_norm {row['hellaswag_acc_norm']:.4f}" if with_hs else ""), flush=True)
    return row


def sweep(runs: list[Run], out_dir: Path, command: str, threads: int | None = None,
          hellaswag_data: str | None = None, hellaswag_limit: int | None = None, jobs: int = 1) -> int:
    """Train every run not yet done (`jobs` train.py processes at a time, in list order), evaluate, write
    results.md/png. Returns the number of runs not finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if hellaswag_limit is not None:
        from eval_hellaswag import load_examples

        load_examples(hellaswag_data, limit=1)  # a missing file fails now, before any training
    print(f"{len(runs)} runs -> {out_dir}" + (f", {jobs} at a time" if jobs > 1 else ""))
    for run in runs:
        print(f"  {run.name:<24} {run.params:>12,} params  {run.config}", flush=True)
    t0 = time.perf_counter()
    sig = _Signals()
    try:
        # threads only wait on their train.py processes; the signal handlers stay in this (the main) thread
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda i: _sweep_one(i, runs, threads, sig, hellaswag_data, hellaswag_limit),
                                    range(len(runs))))
    finally:
        sig.close()
    rows = {run.name: row for run, row in zip(runs, results) if row is not None}
    md, png = write_results(runs, rows, out_dir, command, hellaswag_limit is not None, time.perf_counter() - t0)
    print(f"wrote {md} and {png}")
    unfinished = sum(not rows.get(r.name, {}).get("status", "").startswith("ok") for r in runs)
    if unfinished:
        print(f"{unfinished} run(s) not finished; rerun the same command to continue", file=sys.stderr)
    return unfinished


def preset_configs(name: str) -> tuple[list[str], Path]:
    """A preset's CONFIG[@SEED] list, in the order it trains: first the variants with their own seed count
    (more_seeds: the headline comparisons), all their seeds; then the rest in rounds, every variant's first
    seed before any second one. A sweep stopped early has then compared what matters most."""
    preset = PRESETS[name]
    files = {p.stem: p for p in sorted((REPO / preset.folder).glob("*.py"))}
    unknown = set(preset.more_seeds) - set(files)
    assert not unknown, f"preset {name}: no config for {sorted(unknown)}"

    def specs(stem: str, k: int) -> str:
        return os.path.relpath(files[stem]) + (f"@{EXTRA_SEEDS[k - 1]}" if k else "")

    first = ["baseline", *(v for v in preset.more_seeds if v != "baseline")]
    configs = [specs(v, k) for v in first for k in range(preset.more_seeds.get(v, preset.seeds))]
    rest = [v for v in files if v not in first]
    configs += [specs(v, k) for k in range(preset.seeds) for v in rest]
    return configs, Path(preset.out_dir)


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="*", help="train.py config files, each optionally CONFIG@SEED")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="cpu: config/ablations/*.py + baseline@1338; learn: config/ablations_learn/*.py, 2-3 seeds")
    p.add_argument("--out-dir", default=None, help="sweep folder (default out/ablations, preset: its own)")
    p.add_argument("--data-dir", default=None, help="override every config's data_dir")
    p.add_argument("--seed", type=int, default=None, help="override every config's seed (CONFIG@SEED wins)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a train.py override for every run, e.g. --set max_steps=20 (repeatable)")
    p.add_argument("--jobs", type=int, default=1, help="train.py processes at once (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for each training process (default with --jobs N > 1: CPUs / N)")
    p.add_argument("--hellaswag-limit", type=int, default=None,
                   help="also score HellaSwag acc_norm on each final checkpoint, first N examples (0 = all)")
    p.add_argument("--hellaswag-data", default=None, help="local hellaswag_val.jsonl (default: the HF hub)")
    a = p.parse_args(argv)
    if a.preset and a.configs:
        p.error("give config files or --preset, not both")
    for s in a.set:
        if "=" not in s or s.startswith("-"):
            p.error(f"--set {s}: expected KEY=VALUE, e.g. --set max_steps=20")
    configs, out_dir = preset_configs(a.preset) if a.preset else (a.configs, Path("out/ablations"))
    out_dir = Path(a.out_dir) if a.out_dir else out_dir
    if a.jobs < 1:
        p.error(f"--jobs {a.jobs}: must be at least 1")
    threads = a.threads or (max(1, (os.cpu_count() or 1) // a.jobs) if a.jobs > 1 else None)  # no oversubscribing
    runs = plan(configs, out_dir, a.set, a.seed, a.data_dir)
    command = "python ablate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if sweep(runs, out_dir, command, threads, a.hellaswag_data, a.hellaswag_limit, a.jobs):
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
