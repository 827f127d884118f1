"""How much a model uses what it has already read: its mean loss at each position of the val split's rows,
and the in-context-learning score of Olsson et al. 2022.

The score ("In-context Learning and Induction Heads") is the loss late in the context minus the loss early in
it. Here "late" is positions 450-549 and "early" 40-59 (windows around the paper's 500th and 50th token, for
less noise); a clearly negative score means later tokens are easier because the model uses the context
(copying names and rare words, as LAMBADA needs); a score near 0 means it predicts from the last few tokens
only.

    python scripts/context_use.py out/reproduction_full/init_s1337/ckpt.pt \\
        out/reproduction_full/baseline_s1337/ckpt.pt --data-dir data/wiki

Rows are the val split in file order (train.py's val rows, `TokenLoader(shuffle=False)`), all of them unless
--rows is given, in whole batches. Prints one JSON object per model: rows used, mean loss per position
bucket, and the score ± its standard error over rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from checkpoint import load_model  # noqa: E402
from data import TokenLoader  # noqa: E402
from errors import ArgumentParser, UserError, run_main  # noqa: E402
from model import GPT  # noqa: E402

EARLY, LATE = (40, 60), (450, 550)  # position windows [start, end) of the score
BUCKETS = ((0, 1), (1, 10), (10, 50), (50, 100), (100, 250), (250, 500), (500, 1024))


@torch.no_grad()
def row_losses(model: GPT, data_dir: str | Path, seq_len: int = 1024, batch_size: int = 4,
               rows: int | None = None) -> torch.Tensor:
    """Cross-entropy (nats), shape (rows, seq_len), of the first `rows` val rows (all if None, rounded down to
    whole batches); position t scores token t + 1 given tokens 0..t."""
    loader = TokenLoader(data_dir, "val", batch_size, seq_len, shuffle=False)
    n = loader.n_rows if rows is None else min(rows, loader.n_rows)
    n -= n % batch_size
    if n == 0:
        raise UserError(f"--rows {rows} is less than one batch of {batch_size} rows")
    model.eval()
    out = []
    for _ in range(n // batch_size):
        x, y = loader.next_batch()
        logits, _ = model(x)
        out.append(F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").double())
    return torch.cat(out)


def summarize(losses: torch.Tensor) -> dict:
    """Mean loss per position bucket, and the ICL score with its standard error over rows (each row's late
    minus early window mean is one sample)."""
    n, T = losses.shape
    per_row = losses[:, LATE[0]:LATE[1]].mean(1) - losses[:, EARLY[0]:EARLY[1]].mean(1)
    stderr = per_row.std().item() / n ** 0.5 if n > 1 else float("nan")
    return {"rows": n,
            "loss_by_position": {f"{a}-{min(b, T) - 1}": round(losses[:, a:b].mean().item(), 4)
                                 for a, b in BUCKETS if a < T},
            "icl_score": round(per_row.mean().item(), 4), "icl_score_stderr": round(stderr, 4)}


def main() -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="checkpoint files (train.py's ckpt.pt) or HF GPT-2 folders")
    p.add_argument("--data-dir", default="data/wiki", help="prepare_data.py output whose val split to read")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rows", type=int, default=None, help="val rows to use (default: all)")
    a = p.parse_args()
    if a.seq_len < LATE[1]:  # checked before any model runs
        raise UserError(f"--seq-len {a.seq_len} is shorter than the score's late window (positions "
                        f"{LATE[0]}-{LATE[1] - 1})")
    for m in a.models:
        model = load_model(m)
        if a.seq_len > model.config.block_size:
            raise UserError(f"--seq-len {a.seq_len} exceeds {m}'s block_size {model.config.block_size}")
        losses = row_losses(model, a.data_dir, a.seq_len, a.batch_size, a.rows)
        print(json.dumps({"model": m, **summarize(losses)}), flush=True)


if __name__ == "__main__":
    run_main(main)
