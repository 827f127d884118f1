# Ablation: document masking: attention within each EOT-delimited document only, positions restart per document.
# Run: python train.py config/ablations/doc_mask.py   (baseline.py holds everything else)
from config.ablations.baseline import *  # noqa: F403

out_dir = "out/ablations/doc_mask"
model_overrides = {**model_overrides, "doc_mask": True}  # noqa: F405
