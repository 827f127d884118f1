# Ablation: a modern recipe, nanochat's (karpathy/nanochat gpt.py) on our GPT: RoPE + QK-norm + RMSNorm + ReLU^2 MLP
# + untied head + no biases, trained with Muon exactly as muon.py (nanochat's settings, lrs scaled to n_embd 128).
# Run: python train.py config/ablations_learn/modern.py   (baseline.py holds everything else)
from config.ablations_learn.muon import *  # noqa: F403

out_dir = "out/ablations_learn/modern"
model_overrides = {**model_overrides, "pos": "rope", "qk_norm": True, "norm": "rmsnorm", "mlp": "relu2",  # noqa: F405
                   "tie_embeddings": False, "bias": False}
