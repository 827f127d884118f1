# Ablation: document masking: attention within each EOT-delimited document only, positions restart per document.
# Run: python train.py config/ablations_learn/doc_mask.py   (baseline.py holds everything else)
from config.ablations_learn.baseline import *  # noqa: F403

out_dir = "out/ablations_learn/doc_mask"
model_overrides = {**model_overrides, "doc_mask": True}  # noqa: F405
