# Ablation: a modern recipe, nanochat's (karpathy/nanochat gpt.py) on our GPT: RoPE + QK-norm + RMSNorm + ReLU^2 MLP
# + untied head + no biases, trained with Muon (torch.optim.Muon) on the blocks' matrices and AdamW on the rest.
# Run: python train.py config/ablations/modern.py   (baseline.py holds everything else)
from config.ablations.baseline import *  # noqa: F403

out_dir = "out/ablations/modern"
model_overrides = {**model_overrides, "pos": "rope", "qk_norm": True, "norm": "rmsnorm", "mlp": "relu2",  # noqa: F405
                   "tie_embeddings": False, "bias": False}
optimizer = "muon"
# nanochat's optimizer settings: Muon lr 0.02 (momentum 0.95, Nesterov: the TrainConfig defaults); AdamW betas
# (0.8, 0.95), eps 1e-10, no weight decay, embedding lr 0.2 and head lr 0.004 scaled by (n_embd / 768)^-0.5 as
# nanochat scales them (n_embd 64: x 3.46). The schedule keeps baseline.py's shape (lr and min_lr): every
# group's lr warms up over 10 steps, then decays by cosine to 0.1 x its base lr.
beta1 = 0.8
eps = 1e-10
weight_decay = 0.0
embed_lr = 0.2 * (64 / 768) ** -0.5
head_lr = 0.004 * (64 / 768) ** -0.5
