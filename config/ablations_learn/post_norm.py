# Ablation: post-norm blocks (original Transformer: norm after each residual add; no final norm).
# Run: python train.py config/ablations_learn/post_norm.py   (baseline.py holds everything else)
from config.ablations_learn.baseline import *  # noqa: F403

out_dir = "out/ablations_learn/post_norm"
model_overrides = {**model_overrides, "norm_placement": "post"}  # noqa: F405
