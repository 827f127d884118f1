# Ablation: SwiGLU MLP (hidden 8/3 d rounded up to 64: 384 for d=128, ~GELU-MLP parameters).
# Run: python train.py config/ablations_learn/swiglu.py   (baseline.py holds everything else)
from config.ablations_learn.baseline import *  # noqa: F403

out_dir = "out/ablations_learn/swiglu"
model_overrides = {**model_overrides, "mlp": "swiglu"}  # noqa: F405
