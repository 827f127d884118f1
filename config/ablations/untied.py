# Ablation: separate output head (embedding not tied; +3.2M parameters at this size).
# Run: python train.py config/ablations/untied.py   (baseline.py holds everything else)
from config.ablations.baseline import *  # noqa: F403

out_dir = "out/ablations/untied"
model_overrides = {**model_overrides, "tie_embeddings": False}  # noqa: F405
