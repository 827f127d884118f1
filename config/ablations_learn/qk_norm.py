# Ablation: LayerNorm on q and k per head before the attention scores.
# Run: python train.py config/ablations_learn/qk_norm.py   (baseline.py holds everything else)
from config.ablations_learn.baseline import *  # noqa: F403

out_dir = "out/ablations_learn/qk_norm"
model_overrides = {**model_overrides, "qk_norm": True}  # noqa: F405
