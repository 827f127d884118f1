# Ablation: sandwich norm (norm before and after each sublayer, as in CogView / Gemma 2).
# Run: python train.py config/ablations_learn/sandwich_norm.py   (baseline.py holds everything else)
from config.ablations_learn.baseline import *  # noqa: F403

out_dir = "out/ablations_learn/sandwich_norm"
model_overrides = {**model_overrides, "norm_placement": "sandwich"}  # noqa: F405
