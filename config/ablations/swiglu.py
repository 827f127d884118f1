# Ablation: SwiGLU MLP (hidden 8/3 d rounded up to 64: 192 for d=64, ~GELU-MLP parameters).
# Run: python train.py config/ablations/swiglu.py   (baseline.py holds everything else)
from config.ablations.baseline import *  # noqa: F403

out_dir = "out/ablations/swiglu"
model_overrides = {**model_overrides, "mlp": "swiglu"}  # noqa: F405
