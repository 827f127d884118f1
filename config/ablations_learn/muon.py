# Ablation: the optimizer alone: modern.py's Muon settings on the baseline's architecture (so modern - muon is the
# architecture's share of modern's gain). torch.optim.Muon on the blocks' matrices (lr 0.02, momentum 0.95,
# Nesterov: the TrainConfig defaults), AdamW on the rest with nanochat's betas (0.8, 0.95), eps 1e-10, no weight
# decay, embedding lr 0.2 and head lr 0.004 scaled by (n_embd / 768)^-0.5 (n_embd 128: x 2.45). The tied
# wte/lm_head takes head_lr. The schedule keeps baseline.py's shape: warmup 10 steps, cosine to 0.1 x each base lr.
# Run: python train.py config/ablations_learn/muon.py   (baseline.py holds everything else)
from config.ablations_learn.baseline import *  # noqa: F403

out_dir = "out/ablations_learn/muon"
optimizer = "muon"
beta1 = 0.8
eps = 1e-10
weight_decay = 0.0
embed_lr = 0.2 * (128 / 768) ** -0.5
head_lr = 0.004 * (128 / 768) ** -0.5
