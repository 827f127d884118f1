# Ablation: separate output head (embedding not tied; +6.4M parameters at this size).
# Run: python train.py config/ablations_learn/untied.py   (baseline.py holds everything else)
from config.ablations_learn.baseline import *  # noqa: F403

out_dir = "out/ablations_learn/untied"
model_overrides = {**model_overrides, "tie_embeddings": False}  # noqa: F405
