"""Time a checkpoint save at GPT-2 124M shape: what a preemption's grace period must cover.

    python scripts/bench_checkpoint.py --out-dir out/bench_ckpt [--repeat 3]

Builds the 124M model with a full AdamW state (exp_avg, exp_avg_sq: one real step on a tiny batch) and saves
it the way train.py does (checkpoint.RunCheckpoints.save: temp file, fsync, rename, folder fsync, step link),
--repeat times into --out-dir, which should be on the disk the run will use. Prints the file size and each
save's seconds. Under ZeRO-1 the run first gathers the optimizer shards on rank 0 (not timed here).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from checkpoint import RunCheckpoints  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from optim import make_adamw, param_groups  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    model = GPT(GPTConfig.from_preset("gpt2"))
    opt = make_adamw(param_groups(model, 0.1), lr=6e-4)
    x = torch.randint(0, 50257, (1, 8))
    model(x, x)[1].backward()
    opt.step()
    state = {"model": model.state_dict(), "model_config": model.config.to_dict(), "optimizer": opt.state_dict(),
             "step": 1}
    ckpts = RunCheckpoints(Path(a.out_dir), keep=2)
    for i in range(a.repeat):
        t0 = time.perf_counter()
        ckpts.save(state, i + 1)
        print(f"save {i + 1}: {time.perf_counter() - t0:.2f} s", flush=True)
    print(f"checkpoint {ckpts.latest}: {ckpts.latest.stat().st_size / 2**30:.2f} GiB "
          f"({model.num_params():,} params + AdamW moments)")


if __name__ == "__main__":
    main()
