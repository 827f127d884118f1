"""The seed-pipeline study's arithmetic and summary (scripts/seed_rows_study.sh, docs/seed_pipeline.md).

    python scripts/seed_rows_study.py steps --loss-tokens 655360 config/seed_rows_cpu.py --rows=seed512
    python scripts/seed_rows_study.py summary out/seed_rows_study --plot out/seed_rows_study/curves.png

`steps`: the max_steps at which a run of these train.py settings has shown its loss `--loss-tokens` targets, on
average over an epoch: packed rows have seq_len targets each, seed512 rows one fewer than their real tokens.
`summary`: a Markdown table per arm and seed (val loss and bits per byte, lm-eval lambada_openai and wikitext at
512 with their stderr), the arms' means and their differences from the first arm against the seed-to-seed spread,
and learning curves against the targets seen.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import load_meta, open_split  # noqa: E402
from errors import ArgumentParser, UserError, run_main  # noqa: E402
from monitor import read_metrics  # noqa: E402
from seed_rows import SEED_MAX_LENGTH, SplitDocuments, seed_windows  # noqa: E402
from train_config import load_config  # noqa: E402


def targets_per_row(data_dir: str | Path, rows: str, seq_len: int, min_tokens: int) -> float:
    """Loss targets per training row, averaged over an epoch of the train split."""
    if rows != "seed512":
        return float(seq_len)  # packed / packed_filtered: every position of a row is a target
    docs = SplitDocuments(open_split(data_dir, "train"), int(load_meta(data_dir).get("eot", 50256)))
    _, _, length = seed_windows(docs.length, SEED_MAX_LENGTH, min_tokens)
    return float(np.maximum(length - 1, 0).sum() / len(length))


def steps_for(loss_tokens: int, train_args: list[str]) -> int:
    """Steps for the loss to see loss_tokens real-token targets. seed_loss_on_padding adds the padding targets
    on top: the same steps and rows as without it."""
    cfg = load_config(train_args)
    rows_per_step = cfg.total_batch_tokens // cfg.seq_len
    per_row = targets_per_row(cfg.data_dir, cfg.rows, cfg.seq_len, cfg.seed_min_tokens)
    return max(1, round(loss_tokens / (rows_per_step * per_row)))


ARM_ROWS = {"packed": "packed rows (today's default)", "seed512": "seed rows, >= 256-token filter (the seed)",
            "seed512_nofilter": "seed rows, no length filter", "packed_filtered": "packed rows, the seed's filter",
            "seed512_padloss": "seed rows, loss on the EOS padding too"}
BOOTSTRAP = 2000  # resamples of the wikitext pages for its stderr


class Run:
    """One trained run of the study: its last val record, targets seen, and lm-eval results at max_length 512."""

    def __init__(self, out: Path, arm: str, seed: int) -> None:
        self.arm, self.seed, self.name = arm, seed, f"{arm}_s{seed}"
        recs = read_metrics(out / self.name)
        train = [r for r in recs if "loss" in r and "tokens" in r]
        val = [r for r in recs if "val_loss" in r]
        if not train or not val:
            raise UserError(f"{out / self.name}: no train or val records yet; has the run finished?")
        self.loss_tokens = int(train[-1].get("loss_tokens", train[-1]["tokens"]))
        self.val_loss, self.val_bpb, self.steps = val[-1]["val_loss"], val[-1].get("val_bpb"), val[-1]["step"]
        # val points against the targets seen, loss_tokens interpolated between the logged steps' records
        xs = [r["tokens"] for r in train]
        ys = [r.get("loss_tokens", r["tokens"]) for r in train]
        self.val_curve = [(float(np.interp(r["tokens"], [0] + xs, [0] + ys)), r["val_loss"]) for r in val]
        self.train_curve = [(y, r["loss"]) for y, r in zip(ys, train)]
        path = out / "eval" / f"{self.name}_L512.json"
        if not path.is_file():
            raise UserError(f"{path} does not exist; run scripts/seed_rows_study.sh to evaluate {self.name}")
        ev = json.loads(path.read_text())
        self.eval = {k.removesuffix("_local"): v for k, v in ev["results"].items()}
        samples = {k.removesuffix("_local"): v for k, v in (ev.get("samples") or {}).items()}
        lam = samples.get("lambada_openai", [])
        self.lambada_ll = np.array([d["perplexity"] for d in sorted(lam, key=lambda d: d["doc_id"])])
        wiki = sorted(samples.get("wikitext", []), key=lambda d: d["doc_id"])
        self.wiki_ll = np.array([d["word_perplexity"][0] for d in wiki])
        self.wiki_words = np.array([d["word_perplexity"][1] for d in wiki], dtype=np.float64)

    def metric(self, key: str) -> tuple[float, float | None]:
        """(value, stderr) of one of the table's metrics; perplexities as ln(perplexity), nats per word."""
        if key == "val_loss":
            return self.val_loss, None
        if key == "val_bpb":
            return self.val_bpb, None
        if key == "lambada_acc":
            r = self.eval["lambada_openai"]
            return r["acc,none"], r["acc_stderr,none"]
        if key == "lambada_lnppl":  # ln ppl = -mean target loglikelihood; stderr by the delta method
            r = self.eval["lambada_openai"]
            return math.log(r["perplexity,none"]), r["perplexity_stderr,none"] / r["perplexity,none"]
        if key == "wikitext_lnppl":  # ln word ppl = -sum ll / sum words over pages; stderr by page bootstrap
            return math.log(self.eval["wikitext"]["word_perplexity,none"]), _page_bootstrap(self.wiki_ll,
                                                                                          self.wiki_words)
        if key == "wikitext_bpb":
            return self.eval["wikitext"]["bits_per_byte,none"], None
        raise KeyError(key)


def _page_bootstrap(ll: np.ndarray, words: np.ndarray, other_ll: np.ndarray | None = None) -> float | None:
    """Stderr of -sum(ll)/sum(words) over resampled pages; with other_ll, of the difference of two models'
    values on the same resampled pages (paired)."""
    if len(ll) < 2:
        return None
    idx = np.random.default_rng(0).integers(0, len(ll), size=(BOOTSTRAP, len(ll)))
    d = ll if other_ll is None else ll - other_ll
    return float(np.std(-d[idx].sum(1) / words[idx].sum(1), ddof=1))


def paired_stderr(a: Run, b: Run, key: str) -> float | None:
    """Stderr of a's metric minus b's on the same items: per-item lambada loglikelihood differences, wikitext
    pages resampled together; None where the metric has no items (val loss, bits per byte)."""
    if key == "lambada_lnppl" and len(a.lambada_ll) == len(b.lambada_ll) > 1:
        return float(np.std(a.lambada_ll - b.lambada_ll, ddof=1) / math.sqrt(len(a.lambada_ll)))
    if key == "lambada_acc":
        ra, rb = a.eval["lambada_openai"], b.eval["lambada_openai"]
        return math.hypot(ra["acc_stderr,none"], rb["acc_stderr,none"])  # unpaired: per-item acc is not logged
    if key == "wikitext_lnppl" and len(a.wiki_ll) == len(b.wiki_ll) > 1:
        return _page_bootstrap(a.wiki_ll, a.wiki_words, b.wiki_ll)
    return None


METRICS = [("val_loss", "val loss", 4), ("val_bpb", "val bits/byte", 4), ("lambada_lnppl", "lambada ln ppl", 4),
           ("lambada_acc", "lambada acc", 4), ("wikitext_lnppl", "wikitext ln word ppl", 4),
           ("wikitext_bpb", "wikitext bits/byte", 4)]


def _fmt(v: float, se: float | None, nd: int) -> str:
    return f"{v:.{nd}f}" + (f" ± {se:.{nd}f}" if se is not None else "")


def summary(out: Path, arms: list[str], seeds: list[int], plot_path: Path | None = None) -> str:
    runs = {(a, s): Run(out, a, s) for a in arms for s in seeds
            if (out / f"{a}_s{s}" / "done").is_file() and (out / "eval" / f"{a}_s{s}_L512.json").is_file()}
    missing = [f"{a}_s{s}" for a in arms for s in seeds if (a, s) not in runs]
    if not runs:
        raise UserError(f"{out}: none of the runs has finished and been evaluated")
    lines = [f"# Seed-pipeline study: {out}", "",
             "Per run (lm-eval 0.4.13 at max_length 512, value ± stderr; ln ppl = ln(perplexity), nats per target "
             "word; wikitext stderr by a bootstrap over its pages; val: the run's last val pass on the common "
             "packed val rows):", "",
             "| run | steps | loss targets | " + " | ".join(t for _, t, _ in METRICS) + " | lambada ppl | "
             "wikitext word ppl |",
             "|---|---|---|" + "---|" * (len(METRICS) + 2)]
    for r in runs.values():
        cells = [_fmt(*r.metric(k), nd) for k, _, nd in METRICS]
        lam, wiki = r.eval["lambada_openai"], r.eval["wikitext"]
        lines.append(f"| {r.name} | {r.steps} | {r.loss_tokens:,} | " + " | ".join(cells) +
                     f" | {lam['perplexity,none']:,.0f} ± {lam['perplexity_stderr,none']:,.0f} | "
                     f"{wiki['word_perplexity,none']:,.1f} |")
    if missing:
        lines += ["", f"Not finished, left out: {', '.join(missing)}."]
    base = arms[0]
    base_seeds = [s for s in seeds if (base, s) in runs]
    lines += ["", f"Seed-to-seed spread of {base} (max − min over seeds {', '.join(map(str, base_seeds))}): " +
              ", ".join(f"{t} {np.ptp([runs[base, s].metric(k)[0] for s in base_seeds]):.4f}"
                        for k, t, _ in METRICS), "",
              f"Differences from {base}, per seed (same seed: same initial weights) ± the paired stderr, their mean, "
              f"and the verdict: **beyond noise** when every seed's difference has the same sign, the mean exceeds "
              f"{base}'s seed-to-seed spread, and, where the metric has items, twice the mean paired stderr.", "",
              "| arm | " + " | ".join(f"Δ {t}" for _, t, _ in METRICS) + " |",
              "|---|" + "---|" * len(METRICS)]
    for arm in arms[1:]:
        paired = [s for s in base_seeds if (arm, s) in runs]
        if not paired:
            continue
        cells = []
        for k, _, nd in METRICS:
            d = [runs[arm, s].metric(k)[0] - runs[base, s].metric(k)[0] for s in paired]
            se = [paired_stderr(runs[arm, s], runs[base, s], k) for s in paired]
            spread = np.ptp([runs[base, s].metric(k)[0] for s in base_seeds])
            mean = float(np.mean(d))
            noise = [spread] + ([2 * float(np.mean(se))] if None not in se else [])
            beyond = len(set(np.sign(d))) == 1 and abs(mean) > max(noise)
            per_seed = ", ".join(_fmt(x, e, nd) for x, e in zip(d, se))
            cells.append(f"{mean:+.{nd}f} ({per_seed}){' **beyond noise**' if beyond else ''}")
        lines.append(f"| {arm}: {ARM_ROWS.get(arm, arm)} (seeds {', '.join(map(str, paired))}) | " +
                     " | ".join(cells) + " |")
    lines += ["", "Seed noise pooled over every arm: the standard deviation of one run's metric across seeds, pooled "
              "over the arms (sample variances weighted by seeds − 1), and each arm's mean difference from "
              f"{base} in units of that noise's standard error for the two means, SD × sqrt(1/n_arm + 1/n_{base}):",
              "", "| metric | pooled seed SD | " + " | ".join(f"{a} − {base}" for a in arms[1:]) + " |",
              "|---|---|" + "---|" * (len(arms) - 1)]
    for k, t, nd in METRICS:
        per_arm = {a: [runs[a, s].metric(k)[0] for s in seeds if (a, s) in runs] for a in arms}
        dof = sum(len(v) - 1 for v in per_arm.values() if len(v) > 1)
        if not dof:
            continue
        sd = math.sqrt(sum(np.var(v, ddof=1) * (len(v) - 1) for v in per_arm.values() if len(v) > 1) / dof)
        cells = []
        for a in arms[1:]:
            if not per_arm[a] or not per_arm[base]:
                cells.append("—")
                continue
            d = float(np.mean(per_arm[a]) - np.mean(per_arm[base]))
            se = sd * math.sqrt(1 / len(per_arm[a]) + 1 / len(per_arm[base]))
            cells.append(f"{d:+.{nd}f} = {d / se:+.1f} SE" if se > 0 else f"{d:+.{nd}f}")
        lines.append(f"| {t} | {sd:.{nd}f} | " + " | ".join(cells) + " |")
    if plot_path is not None:
        lines += ["", f"Curves: {plot_curves(runs, plot_path)}"]
    return "\n".join(lines) + "\n"


def plot_curves(runs: dict[tuple[str, int], Run], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(a for a, _ in runs))
    seeds = list(dict.fromkeys(s for _, s in runs))
    colors = {a: f"C{i}" for i, a in enumerate(arms)}
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (arm, seed), r in runs.items():
        ls = styles[seeds.index(seed) % len(styles)]
        x, y = zip(*r.val_curve)
        axes[0].plot(x, y, ls, marker="o", ms=3, color=colors[arm], label=f"{arm} s{seed}")
        x, y = zip(*r.train_curve)
        axes[1].plot(x, y, ls, color=colors[arm], alpha=0.8, label=f"{arm} s{seed}")
    for ax, title in zip(axes, ["val loss (common packed val rows)", "train loss (each arm's own rows)"]):
        ax.set_title(title)
        ax.set_xlabel("loss targets seen")
        ax.grid(alpha=0.3)
    for ax in axes:  # the first steps' losses (~10.8) would squash the rest: cut the axis at 9 once below it
        lo, hi = ax.get_ylim()
        if lo < 8.5:
            ax.set_ylim(lo, min(hi, 9.0))
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def eot_split(out: Path, arms: list[str], seeds: list[int]) -> str:
    """Each model's val loss on the common val rows, split by target: the EOT that ends a document, the first
    token of a document (its input is the EOT), and all other targets. seed512 rows hold no EOT at all, so
    these models never saw one; the split shows how much of a val difference sits at document boundaries."""
    import torch
    import torch.nn.functional as F

    from checkpoint import load_checkpoint, model_from_checkpoint
    from data import TokenLoader

    lines = ["| run | val loss (recomputed) | EOT targets | first tokens of documents | other targets |",
             "|---|---|---|---|---|"]
    for arm in arms:
        for seed in seeds:
            if not (out / f"{arm}_s{seed}" / "done").is_file():
                continue  # not run (or not finished)
            ckpt = load_checkpoint(out / f"{arm}_s{seed}" / "ckpt.pt")
            cfg, model = ckpt["train_config"], model_from_checkpoint(ckpt).eval()
            eot = int(load_meta(cfg["data_dir"]).get("eot", 50256))
            loader = TokenLoader(cfg["data_dir"], "val", cfg["micro_batch"], cfg["seq_len"], shuffle=False)
            rows = min(cfg["eval_tokens"] // cfg["seq_len"], loader.n_rows)
            losses, xs, ys = [], [], []
            with torch.no_grad():
                for start in range(0, rows, cfg["micro_batch"]):  # the rows train.py's estimate_val_loss reads
                    x, y = loader.next_batch()
                    n = min(cfg["micro_batch"], rows - start)
                    logits, _ = model(x[:n])
                    losses.append(F.cross_entropy(logits.float().flatten(0, 1), y[:n].flatten(), reduction="none"))
                    xs.append(x[:n].flatten())
                    ys.append(y[:n].flatten())
            loss, x, y = torch.cat(losses), torch.cat(xs), torch.cat(ys)
            parts = [y == eot, (x == eot) & (y != eot), (x != eot) & (y != eot)]
            cells = [f"{loss[m].mean().item():.3f} ({int(m.sum()):,}; {loss[m].sum().item() / len(loss):.4f} of "
                     "the mean)" for m in parts]
            lines.append(f"| {arm}_s{seed} | {loss.mean().item():.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def same_losses(a: Path, b: Path) -> str:
    """Whether two runs logged the same losses at every step both logged, to the digits train.py prints."""
    ra, rb = ({(r["step"], k): r[k] for r in read_metrics(d) for k in ("loss", "val_loss") if k in r} for d in (a, b))
    common = sorted(set(ra) & set(rb))
    if not common:
        raise UserError(f"{a} and {b} have no logged step in common")
    diff = [k for k in common if f"{ra[k]:.4f}" != f"{rb[k]:.4f}"]
    bitwise = sum(ra[k] == rb[k] for k in common)
    return (f"{len(common)} losses logged by both (steps {common[0][0]}-{common[-1][0]}): {len(diff)} differ at 4 "
            f"decimals, {bitwise} equal bit for bit" + (f"; first difference at {diff[0]}" if diff else ""))


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("steps", help="print max_steps for a run of these train.py settings")
    s.add_argument("--loss-tokens", type=int, required=True, help="targets the loss should see in the run")
    s.add_argument("train_args", nargs="+", help="train.py's config file and --key=value overrides")
    m = sub.add_parser("summary", help="the study's Markdown tables (and curves with --plot)")
    m.add_argument("out", help="the study's folder (scripts/seed_rows_study.sh's OUT)")
    m.add_argument("--arms", nargs="+", default=list(ARM_ROWS), help="the first is the reference")
    m.add_argument("--seeds", nargs="+", type=int, default=[1337, 1338], help="runs not finished are left out")
    m.add_argument("--plot", help="also draw the curves to this PNG")
    e = sub.add_parser("eot", help="each model's val loss split at document boundaries")
    e.add_argument("out")
    e.add_argument("--arms", nargs="+", default=list(ARM_ROWS))
    e.add_argument("--seeds", nargs="+", type=int, default=[1337, 1338])
    c = sub.add_parser("same", help="do two runs' logged losses agree to the printed digit?")
    c.add_argument("run_a")
    c.add_argument("run_b")
    args, rest = p.parse_known_args(argv)
    if args.cmd == "steps":
        if args.loss_tokens <= 0:
            raise UserError("--loss-tokens must be > 0")
        print(steps_for(args.loss_tokens, args.train_args + rest))
        return
    if rest:
        raise UserError(f"unknown arguments {rest}")
    if args.cmd == "summary":
        print(summary(Path(args.out), args.arms, args.seeds, Path(args.plot) if args.plot else None), end="")
    elif args.cmd == "eot":
        print(eot_split(Path(args.out), args.arms, args.seeds), end="")
    else:
        print(same_losses(Path(args.run_a), Path(args.run_b)))


if __name__ == "__main__":
    run_main(main)
