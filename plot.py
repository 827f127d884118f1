"""Draw a run's curves from out/<run>/metrics.jsonl: train/val loss, learning rate, tokens per second
(and HellaSwag acc_norm when logged) to out/<run>/metrics.png.

    python plot.py out/shakespeare_cpu            # -> out/shakespeare_cpu/metrics.png
    python plot.py out/a out/b --out cmp.png      # several runs on the same axes
"""

from __future__ import annotations

import math
from pathlib import Path

from errors import ArgumentParser, run_main
from monitor import read_metrics


def plot(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    runs = {str(d): read_metrics(d) for d in run_dirs}
    panels = [("loss", "loss"), ("lr", "learning rate"), ("tok_per_s", "tokens / s")]
    if any("hellaswag_acc_norm" in r for recs in runs.values() for r in recs):
        panels.append(("hellaswag_acc_norm", "HellaSwag acc_norm"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels):
        for name, recs in runs.items():
            pts = [(r["tokens"], r[key]) for r in recs if r.get(key) is not None and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), label=f"{name} train" if key == "loss" else name)
            if key == "loss":
                val = [(r["tokens"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
                if val:
                    ax.plot(*zip(*val), "o-", label=f"{name} val")
        ax.set_title(title)
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dirs[0]) / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", help="train.py out_dir(s) holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG path (default: <first run>/metrics.png)")
    a = p.parse_args()
    print(f"wrote {plot(a.run_dirs, a.out)}")


if __name__ == "__main__":
    run_main(main)
