# Ablation: RMSNorm instead of LayerNorm (no centering, no bias), everywhere a norm is used.
# Run: python train.py config/ablations_learn/rmsnorm.py   (baseline.py holds everything else)
from config.ablations_learn.baseline import *  # noqa: F403

out_dir = "out/ablations_learn/rmsnorm"
model_overrides = {**model_overrides, "norm": "rmsnorm"}  # noqa: F405
