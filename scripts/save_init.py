"""Save the model a train.py config starts from (step 0, before any update) as a checkpoint eval scripts read.

    python scripts/save_init.py config/wikipedia_cpu.py --seed=1337 --out out/wiki_init/ckpt.pt

Takes the same arguments as train.py (config files and --key=value overrides) plus --out. The weights equal
train.py's at step 0 for that seed: train.py seeds torch with `seed + rank` (rank 0 here) and builds
`GPT(model_config(cfg))` before anything else draws random numbers (tests/test_reproduction_smoke.py checks
the init checkpoint's val loss and first-batch loss against train.py's logged step-0 values).
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from checkpoint import save_checkpoint  # noqa: E402
from errors import UserError, run_main  # noqa: E402
from model import GPT  # noqa: E402
from train import load_config, model_config  # noqa: E402


def save_init(argv: list[str], out: str | Path) -> Path:
    """Build train.py's step-0 model for the config in argv and write it to out (model + configs, step 0)."""
    cfg = load_config(argv)
    if cfg.init_from != "scratch":
        raise UserError(f"init_from={cfg.init_from!r}: save_init.py only writes a from-scratch initialisation")
    torch.manual_seed(cfg.seed)  # train.py: torch.manual_seed(cfg.seed + rank), then GPT(...)
    model = GPT(model_config(cfg))
    out = Path(out)
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict(),
                     "train_config": asdict(cfg), "step": 0, "tokens_seen": 0}, out)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = None
    rest = []
    for i, a in enumerate(argv):
        if a.startswith("--out="):
            out = a.split("=", 1)[1]
        elif a == "--out":
            if i + 1 >= len(argv):
                raise UserError("--out needs a path, e.g. --out out/init/ckpt.pt")
            out = argv[i + 1]
        elif i > 0 and argv[i - 1] == "--out":
            continue
        else:
            rest.append(a)
    if not out:
        raise UserError("pass --out PATH for the init checkpoint, e.g. --out out/wiki_init/ckpt.pt")
    print(f"saved step-0 model to {save_init(rest, out)}")


if __name__ == "__main__":
    run_main(main)
