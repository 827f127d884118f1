# Ablation: ReLU² MLP (relu(x)², hidden 4d, as in nanochat / Primer) instead of GELU.
# Run: python train.py config/ablations_learn/relu2.py   (baseline.py holds everything else)
from config.ablations_learn.baseline import *  # noqa: F403

out_dir = "out/ablations_learn/relu2"
model_overrides = {**model_overrides, "mlp": "relu2"}  # noqa: F405
