# Ablation: no position information at all (NoPE); the causal mask alone carries order.
# Run: python train.py config/ablations/nope.py   (baseline.py holds everything else)
from config.ablations.baseline import *  # noqa: F403

out_dir = "out/ablations/nope"
model_overrides = {**model_overrides, "pos": "none"}  # noqa: F405
