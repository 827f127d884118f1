# Ablation: mixture of 4 GELU experts, top-2 token-choice routing, load-balancing aux loss 0.01 (dropless).
# Run: python train.py config/ablations_learn/moe.py   (baseline.py holds everything else)
from config.ablations_learn.baseline import *  # noqa: F403

out_dir = "out/ablations_learn/moe"
model_overrides = {**model_overrides, "mlp": "moe", "n_experts": 4, "moe_top_k": 2}  # noqa: F405
