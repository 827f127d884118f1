"""A run's report: out/<run>/report.md and its learning curves, from what the run folder holds.

    python report.py out/shakespeare_cpu     # -> out/shakespeare_cpu/{report.md,loss.png,throughput.png}

Everything comes from the folder: metrics.jsonl (train.py's log: a `launch` record with the command line,
the resolved config and the machine at every start or resume, then the train and val records, each with its
wall-clock `time`) and, where they are there, the JSON files of `eval_lm.py --out` and `eval_hellaswag.py
--out` (any *.json in the folder; recognised by their content). Evaluation results are shown next to OpenAI
GPT-2 124M's published numbers, each with its source (docs/evaluation.md "Reference numbers").
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch

from errors import ArgumentParser, UserError, run_main
from model import GPT, GPTConfig
from monitor import read_metrics

# OpenAI GPT-2 124M, published figures (not measured with this code; docs/evaluation.md keeps the same table):
# (task, metric) -> (value, protocol, source).
LLMC = "karpathy/llm.c, docstring of dev/data/hellaswag.py"
LAMBADA = "lm-eval `hf`, max_length 1024 (every request fits in 224 tokens: the same at >= 224)"
GPT2_124M_PUBLISHED = {
    ("hellaswag", "acc"): (0.2892, "lm-eval `hellaswag`, 0-shot, val (10,042)", LLMC + " (\"eleuther harness\")"),
    ("hellaswag", "acc_norm"): (0.3114, "lm-eval `hellaswag`, 0-shot, val (10,042)", LLMC + " (\"eleuther harness\")"),
    ("hellaswag", "llmc_acc"): (0.2859, "llm.c completion style, val (10,042)", LLMC),
    ("hellaswag", "llmc_acc_norm"): (0.2955, "llm.c completion style, val (10,042)", LLMC),
    ("lambada_openai", "acc"): (0.3256, LAMBADA, "EleutherAI/lm-evaluation-harness issue #2159"),
    ("lambada_openai", "perplexity"): (40.0554, LAMBADA, "EleutherAI/lm-evaluation-harness issue #2159"),
    ("wikitext", "word_perplexity"): (37.37, "lm-eval (2021 version), max_length 1024",
                                      "huggingface/transformers issue #13761"),
}
LM_EVAL_METRICS = {"hellaswag": ("acc", "acc_norm"), "lambada_openai": ("acc", "perplexity"),
                   "wikitext": ("word_perplexity", "byte_perplexity", "bits_per_byte")}
HELLASWAG_METRICS = ("acc", "acc_norm", "llmc_acc", "llmc_acc_norm")


# ----------------------------------------------------------------------------------------------------
# Reading the run


@dataclasses.dataclass
class Launch:
    record: dict  # the launch record: step, time, launch={argv, config, machine}
    last_time: float | None  # the last record's time before the next launch


def read_run(run_dir: Path) -> tuple[list[Launch], list[dict], list[dict], list[dict]]:
    """(launches, train records, val records) of a train.py out_dir, in file order."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; pass a train.py out_dir (e.g. out/shakespeare_cpu)")
    if not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; pass a train.py out_dir (e.g. out/shakespeare_cpu)")
    records = read_metrics(run_dir)
    if not any("loss" in r or "val_loss" in r for r in records):
        raise UserError(f"{run_dir / 'metrics.jsonl'} holds no train or val records yet; report on it once "
                        "train.py has logged a step")
    launches: list[Launch] = []
    for r in records:
        if "launch" in r:
            launches.append(Launch(r, None))
        elif launches and r.get("time") is not None:
            launches[-1].last_time = r["time"]
    return (launches, [r for r in records if "loss" in r], [r for r in records if "val_loss" in r],
            [r for r in records if r.get("hellaswag_acc_norm") is not None])


def summarize(launches: list[Launch], train: list[dict], val: list[dict]) -> dict:
    """The report's numbers. Median tokens/s and MFU are over the recorded steps, leaving out the first step of
    each process (warm-up, compilation: the records that carry first_step_s), unless that leaves nothing."""
    steady = [r for r in train if "first_step_s" not in r] or train
    speeds = [r["tok_per_s"] for r in steady if r.get("tok_per_s")]
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    mems = [r["peak_mem_gib"] for r in train if r.get("peak_mem_gib") is not None]
    finite_val = [r for r in val if math.isfinite(r["val_loss"])]
    timed = [(ln.record["time"], ln.last_time) for ln in launches if ln.last_time is not None]
    return {
        "steps": train[-1]["step"] + 1 if train else 0,
        "tokens": max(r["tokens"] for r in train + val),
        "wall_s": sum(end - start for start, end in timed) if timed else None,
        "tok_per_s": statistics.median(speeds) if speeds else None,
        "windows": len(speeds),
        "mfu": statistics.median(mfus) if mfus else None,
        "first_step_s": [r["first_step_s"] for r in train if "first_step_s" in r],
        "peak_mem_gib": max(mems) if mems else None,
        "train_loss": train[-1]["loss"] if train else None,
        "val_loss": val[-1]["val_loss"] if val else None,
        "val_step": val[-1]["step"] if val else None,
        "best_val": min(finite_val, key=lambda r: r["val_loss"]) if finite_val else None,
    }


def find_evals(run_dir: Path) -> list[tuple[Path, str, dict]]:
    """(file, "lm_eval" | "hellaswag", content) for each eval_lm.py / eval_hellaswag.py --out file in run_dir."""
    found = []
    for path in sorted(run_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not ours: a report lists what it recognises and ignores the rest
        if isinstance(data, dict) and isinstance(data.get("results"), dict) and "tasks" in data:
            found.append((path, "lm_eval", data))
        elif isinstance(data, dict) and all(k in data for k in ("acc_norm", "llmc_acc_norm", "n")):
            found.append((path, "hellaswag", data))
    return found


# ----------------------------------------------------------------------------------------------------
# Formatting


def fmt_value(metric: str, v: object) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "—"
    return f"{v:.2f}" if "perplexity" in metric else f"{v:.4f}"


def fmt_duration(s: float) -> str:
    s = round(s)
    h, m, sec = s // 3600, s // 60 % 60, s % 60
    return f"{h} h {m:02d} min" if h else f"{m} min {sec:02d} s" if m else f"{sec} s"


def fmt_machine(m: dict) -> str:
    procs = f"{m['world_size']} process{'es' if m['world_size'] > 1 else ''}"
    if m.get("gpu"):
        where = f"{m['gpu']}, {procs} on {m['nodes']} node{'s' if m['nodes'] > 1 else ''}, CUDA {m.get('cuda')}"
    else:
        where = f"{m['device']}, {procs}, {m.get('torch_threads')} torch thread(s)"
    return f"{where}; host CPU {m['cpu']} ({m['cpu_count']} cores); torch {m['torch']}, Python {m['python']}"


def utc(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def eval_rows(evals: list[tuple[Path, str, dict]], hook: list[dict], config: dict | None) -> list[list[str]]:
    """Table rows: file, task, metric, this run, n, max_length, GPT-2 124M published, its protocol and source."""
    rows = []

    def add(file: str, task: str, base: str, metric: str, value: object, stderr: object, n: object,
            max_length: object) -> None:
        ours = fmt_value(metric, value)
        if isinstance(stderr, (int, float)) and math.isfinite(stderr) and ours != "—":
            ours += f" ± {fmt_value(metric, stderr)}"
        ref = GPT2_124M_PUBLISHED.get((base, metric))
        published = (f"{ref[0]:g}", f"{ref[1]}; {ref[2]}") if ref else ("—", "no published figure")
        rows.append([file, task, metric, ours, str(n), str(max_length), *published])

    for path, kind, data in evals:
        if kind == "lm_eval":
            for task, res in data["results"].items():
                base = task.removesuffix("_local")
                n = (data.get("n-samples") or {}).get(task, {}).get("effective", "?")
                for metric in LM_EVAL_METRICS.get(base, ()):
                    if f"{metric},none" in res:
                        add(path.name, task, base, metric, res[f"{metric},none"], res.get(f"{metric}_stderr,none"),
                            n, data.get("max_length"))
        else:
            for metric in HELLASWAG_METRICS:
                add(path.name, "hellaswag", "hellaswag", metric, data[metric], data.get(f"{metric}_stderr"),
                    data["n"], data.get("max_length"))
    if hook:  # train.py's hellaswag_interval hook: evaluate_hellaswag's default max_length, capped at block_size
        n = (config or {}).get("hellaswag_limit") or "all"
        mc = model_config_of(config)
        max_length = min(512, mc.block_size) if mc else "512 or block_size"
        add(f"metrics.jsonl (step {hook[-1]['step']})", "hellaswag", "hellaswag", "acc_norm",
            hook[-1]["hellaswag_acc_norm"], None, n, max_length)
    return rows


def md_table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows])


def config_defaults() -> dict:
    from train_config import TrainConfig

    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(TrainConfig)}


def model_config_of(config: dict | None) -> GPTConfig | None:
    """The GPTConfig a recorded TrainConfig builds; None for a config of another version of this code."""
    from train_config import TrainConfig

    try:
        return TrainConfig(**config).model_config() if config else None
    except (TypeError, UserError):
        return None


def model_line(mc: GPTConfig) -> str:
    """The model and its size (built on the meta device: no memory, no init time)."""
    with torch.device("meta"):
        n = GPT(mc).num_params()
    return (f"{mc.n_layer} layers, {mc.n_head} heads, n_embd {mc.n_embd}, block_size {mc.block_size}, "
            f"vocab {mc.vocab_size}: {n:,} parameters")


# ----------------------------------------------------------------------------------------------------
# Figures


def plot_curves(run_dir: Path, train: list[dict], val: list[dict], median_tok_s: float | None = None) -> list[Path]:
    """loss.png (train and val loss against steps and tokens) and throughput.png (tokens/s, MFU, lr by step)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x in zip(axes, ("step", "tokens")):
        pts = [(r[x] + (1 if x == "step" else 0), r["loss"]) for r in train if math.isfinite(r["loss"])]
        if pts:  # a train record's step is the step just taken: after it, step + 1 steps are done
            ax.plot(*zip(*pts), label="train loss")
        vpts = [(r[x], r["val_loss"]) for r in val if math.isfinite(r["val_loss"])]
        if vpts:
            ax.plot(*zip(*vpts), "o-", label="val loss")
        ax.set_xlabel("steps done" if x == "step" else "tokens seen")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    paths = [run_dir / "loss.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    if train:
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        ax[0].plot([r["step"] for r in train], [r["tok_per_s"] for r in train], label="tokens/s")
        if median_tok_s:
            ax[0].axhline(median_tok_s, color="gray", ls="--", label=f"median {median_tok_s:,.0f}")
        ax[0].legend()
        ax[0].set_ylabel("tokens / s (median step of each log window)")
        mfu = [(r["step"], 100 * r["mfu"]) for r in train if r.get("mfu") is not None]
        if mfu:
            twin = ax[0].twinx()
            twin.plot(*zip(*mfu), color="tab:orange", label="MFU %")
            twin.set_ylabel("MFU (%)")
        ax[1].plot([r["step"] for r in train], [r["lr"] for r in train])
        ax[1].set_ylabel("learning rate")
        for a in ax:
            a.set_xlabel("step")
            a.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(run_dir / "throughput.png")
        fig.savefig(paths[1], dpi=100)
        plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------------
# The report


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    launches, train, val, hellaswag = read_run(run_dir)
    s = summarize(launches, train, val)
    config = launches[-1].record["launch"]["config"] if launches else None
    if config is None and (run_dir / "ckpt.pt").is_file():  # a run logged before launch records existed
        from checkpoint import load_checkpoint

        config = load_checkpoint(run_dir / "ckpt.pt").get("train_config")
    evals = find_evals(run_dir)
    pngs = plot_curves(run_dir, train, val, s["tok_per_s"])
    out = [f"# Run report: {run_dir}", "",
           f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by `python report.py {run_dir}` from "
           f"`{run_dir}/metrics.jsonl`" + (" and the evaluation files beside it." if evals else "."),
           ""]

    out += ["## Command and machine", ""]
    if launches:
        out.append(md_table(["#", "started", "from step", "command line (the process's argv)", "machine"], [
            [str(i), utc(ln.record["time"]), str(ln.record["step"]),
             f"`{shlex.join(ln.record['launch']['argv'])}`", fmt_machine(ln.record["launch"]["machine"])]
            for i, ln in enumerate(launches, 1)]))
    else:
        out.append("Not recorded: this run's metrics.jsonl predates launch records (train.py writes one at every "
                   "start). The config below is the checkpoint's." if config else "Not recorded.")
    out.append("")

    if config:
        defaults = config_defaults()
        changed = [[f"`{k}`", f"`{json.dumps(v)}`", f"`{json.dumps(defaults.get(k))}`"]
                   for k, v in config.items() if k not in defaults or defaults[k] != v]
        out += ["## Config", "", "Fields that differ from TrainConfig's defaults (the resolved config of the last "
                "launch; all fields below):", "", md_table(["field", "value", "default"], changed), ""]
        mc = model_config_of(config)
        if mc is not None:
            out += [f"Model: {model_line(mc)}.", ""]
        out += ["<details><summary>All fields</summary>", "", "```json", json.dumps(config, indent=1), "```", "",
                "</details>", ""]

    rows = [["steps done", f"{s['steps']:,}"], ["tokens seen", f"{s['tokens']:,}"],
            ["wall time", fmt_duration(s["wall_s"]) + (f" ({len(launches)} launches, each from its start to its last "
                                                      "record)" if len(launches) > 1 else " (start to last record)")
             if s["wall_s"] is not None else "not recorded (no launch records)"],
            ["median tokens/s", f"{s['tok_per_s']:,.0f} (median of {s['windows']} steps, the first step of each "
                                "launch left out)" if s["tok_per_s"] else "—"],
            ["median MFU", f"{100 * s['mfu']:.1f}% (same steps)" if s["mfu"] is not None
             else "— (no peak FLOP/s for this device: CPU or an unknown GPU; set peak_flops)"],
            ["first step", ", ".join(f"{x:.1f} s" for x in s["first_step_s"]) + " (warm-up, and compilation with "
                           "compile=True; one per launch)" if s["first_step_s"] else "—"],
            ["peak GPU memory", f"{s['peak_mem_gib']:.2f} GiB" if s["peak_mem_gib"] is not None else "—"],
            ["last train loss", f"{s['train_loss']:.4f} (step {train[-1]['step']})" if train else "—"],
            ["last val loss", f"{s['val_loss']:.4f} (after {s['val_step']} steps)" if val else "—"],
            ["best val loss", f"{s['best_val']['val_loss']:.4f} (after {s['best_val']['step']} steps)"
             if s["best_val"] else "—"]]
    out += ["## Summary", "", md_table(["", ""], rows), ""]

    out += ["## Learning curves", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]

    table = eval_rows(evals, hellaswag, config)
    if table:
        out += ["## Evaluation", "",
                "\"This run\" is measured by the file named; the GPT-2 124M column is OpenAI GPT-2 124M's "
                "**published** figure (not measured with this code), with its protocol and source "
                "(docs/evaluation.md). A subset (n below the full set) or another max_length is not directly "
                "comparable to it.", "",
                md_table(["file", "task", "metric", "this run", "n", "max_length", "GPT-2 124M (published)",
                          "published protocol; source"], table), ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(out))
    return path


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a train.py out_dir (holding metrics.jsonl)")
    a = p.parse_args(argv)
    print(f"wrote {write_report(a.run_dir)}")


if __name__ == "__main__":
    run_main(main)
