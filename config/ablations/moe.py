# Ablation: mixture of 4 GELU experts, top-2 token-choice routing, load-balancing aux loss 0.01 (dropless).
# Run: python train.py config/ablations/moe.py   (baseline.py holds everything else)
from config.ablations.baseline import *  # noqa: F403

out_dir = "out/ablations/moe"
model_overrides = {**model_overrides, "mlp": "moe", "n_experts": 4, "moe_top_k": 2}  # noqa: F405
