# Ablation: RMSNorm instead of LayerNorm (no centering, no bias), everywhere a norm is used.
# Run: python train.py config/ablations/rmsnorm.py   (baseline.py holds everything else)
from config.ablations.baseline import *  # noqa: F403

out_dir = "out/ablations/rmsnorm"
model_overrides = {**model_overrides, "norm": "rmsnorm"}  # noqa: F405
