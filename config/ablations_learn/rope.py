# Ablation: rotary position embeddings (RoPE, base 10000) on q/k instead of learned absolute positions.
# Run: python train.py config/ablations_learn/rope.py   (baseline.py holds everything else)
from config.ablations_learn.baseline import *  # noqa: F403

out_dir = "out/ablations_learn/rope"
model_overrides = {**model_overrides, "pos": "rope"}  # noqa: F405
