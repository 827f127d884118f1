# The modern recipe on config/wikipedia_cpu.py's body and data (docs/modern_cpu.md): the ablation table's `modern`
# (config/ablations_learn/modern.py: RoPE + QK-norm + RMSNorm + ReLU^2 + untied head + no biases, trained with
# Muon) at the Wikipedia CPU scale, everything else as wikipedia_cpu.py (tokens, batch, schedule shape, eval rows).
#   python train.py config/wikipedia_modern_cpu.py        # out/wikipedia_modern_cpu/
# Optimizer, nanochat's settings as in config/ablations_learn/muon.py: torch.optim.Muon on the blocks' matrices
# (lr 0.02, momentum 0.95, Nesterov: the TrainConfig defaults), AdamW on the rest with betas (0.8, 0.95), eps 1e-10,
# no weight decay, embedding lr 0.2 and head lr 0.004 scaled by (n_embd / 768)^-0.5 (n_embd 256: x 1.73).
# lr and min_lr set only the schedule's shape (warmup, cosine to 0), the same as the baseline's.
from config.wikipedia_cpu import *  # noqa: F403

out_dir = "out/wikipedia_modern_cpu"
model_overrides = {**model_overrides, "pos": "rope", "qk_norm": True, "norm": "rmsnorm", "mlp": "relu2",  # noqa: F405
                   "tie_embeddings": False, "bias": False}
optimizer = "muon"
beta1 = 0.8
eps = 1e-10
weight_decay = 0.0
embed_lr = 0.2 * (256 / 768) ** -0.5
head_lr = 0.004 * (256 / 768) ** -0.5
