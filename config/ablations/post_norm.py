# Ablation: post-norm blocks (original Transformer: norm after each residual add; no final norm).
# Run: python train.py config/ablations/post_norm.py   (baseline.py holds everything else)
from config.ablations.baseline import *  # noqa: F403

out_dir = "out/ablations/post_norm"
model_overrides = {**model_overrides, "norm_placement": "post"}  # noqa: F405
