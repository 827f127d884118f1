# Ablation: no biases in any Linear layer or LayerNorm.
# Run: python train.py config/ablations_learn/no_bias.py   (baseline.py holds everything else)
from config.ablations_learn.baseline import *  # noqa: F403

out_dir = "out/ablations_learn/no_bias"
model_overrides = {**model_overrides, "bias": False}  # noqa: F405
