# Ablation: Llama-style recipe: RoPE + RMSNorm + SwiGLU + no biases (tied embeddings kept).
# Run: python train.py config/ablations/llama_like.py   (baseline.py holds everything else)
from config.ablations.baseline import *  # noqa: F403

out_dir = "out/ablations/llama_like"
model_overrides = {**model_overrides, "pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}  # noqa: F405
