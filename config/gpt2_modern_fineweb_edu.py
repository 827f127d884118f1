# GPT-2 124M's body with the modern recipe on FineWeb-edu sample-10BT: RoPE, QK-norm, RMSNorm, ReLU² MLP, untied
# head, no biases, trained with Muon (the blocks' matrices) + AdamW (embeddings, head, gains) for 4,578 steps of
# 524,288 tokens = 2.40B tokens, 24% of config/gpt2_owt.py's 10B. Evaluation, checkpoints and restarts as there.
#   python prepare_data.py --dataset fineweb-edu --streaming     # -> data/fineweb_edu
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_modern_fineweb_edu.py --init_from=auto
#   # against the public FineWeb target (3.28 val loss): FineWeb's own data and val tokens (README, "GPT-2 124M")
#   python prepare_data.py --dataset fineweb --streaming          # -> data/fineweb, val = the first 50,000 docs
#   torchrun ... train.py config/gpt2_modern_fineweb_edu.py --data_dir=data/fineweb --eval_tokens=10485760 \
#       --out_dir=out/gpt2_modern_fineweb
#
# Arithmetic: 162,222,336 parameters (GPT-2 124M's 124,475,904 + the untied 50,304 x 768 head - biases and
# LayerNorm offsets), 0.855 GFLOP/token of training (model.estimate_flops_per_token(1024), the same as GPT-2's: the
# head is used once per token either way), so a step costs what a gpt2_owt.py step costs and the run ~24% of its
# time (time estimates there).
#
# References, not measurements of this code (FineWeb val loss over the first 10,485,760 val tokens, 524,288
# tokens per step; KellerJordan/modded-nanogpt at f411b3d3):
#   llm.c's GPT-2 recipe (records/track_1_short/2024-10-13_llmc): 19,560 steps (10.26B tokens) to 3.2722; first
#     at or below 3.28 at step 17,250.
#   2024-11-03_UntieEmbed (the closest plain record to this architecture: RoPE, QK-norm, ReLU², untied head, Muon;
#     but zero-initialised projections and head and an RMSNorm after the embedding, which model.py lacks):
#     3.2762 after 4,578 steps (2.40B tokens). This config takes its length and schedule.
#   the optimization track (records/track_3_optimization, result #36, 2026-06): 3,250 steps (1.70B tokens) to
#     3.2787 (mean of 10) with tuned Muon + AdamW, against 5,625 steps with AdamW (#2, "most likely undertuned").
# So 4,578 steps is what a similar, less tuned stack needed, not a promise: model.py's modern parts differ in
# init and norms, and Muon's momentum warmup is not implemented. Watch val loss against gpt2_owt.py's curve.
#
# Each setting that differs from the GPT-2 recipe, with its source:
#   architecture: nanochat's (karpathy/nanochat 3a5e0bc5 nanochat/gpt.py), as config/ablations_learn/modern.py.
#   Muon on the blocks' 2-D weights, lr 0.02, momentum 0.95, Nesterov, no weight decay, shape scaling
#     sqrt(max(1, rows/cols)) (torch's adjust_lr_fn="original"): nanochat 3a5e0bc5 (gpt.py setup_optimizers,
#     muon.py) and modded-nanogpt 2024-11-03_UntieEmbed (the same lr and momentum). These are TrainConfig's defaults.
#   AdamW for the rest: embeddings lr 0.2, head lr 0.004 (nanochat's, tuned at n_embd 768, so unscaled here),
#     betas (0.8, 0.95), eps 1e-10, no weight decay: nanochat 3a5e0bc5 (gpt.py setup_optimizers,
#     scripts/base_train.py); norm gains lr 0.04: TrainConfig's default (modded-nanogpt's 2025-01-16 record).
#   schedule: no warmup, lr constant, then linear to 0 over the last 1,308 of 4,578 steps (warmdown_frac 0.2857):
#     2024-11-03_UntieEmbed's warmup_iters 0 / warmdown_iters 1308 (nanochat 3a5e0bc5: warmup 0, warmdown 0.2).
#   grad_clip 1.0 (as GPT-2's recipe and nanochat 3a5e0bc5), bf16, seq 1024, 524,288 tokens per step: unchanged.
from config.gpt2_owt import *  # noqa: F403

data_dir = "data/fineweb_edu"
out_dir = "out/gpt2_modern_fineweb_edu"
wandb_run_name = "gpt2_modern_fineweb_edu"
model_overrides = {"pad_vocab_multiple": 64, "pos": "rope", "qk_norm": True, "norm": "rmsnorm", "mlp": "relu2",
                   "tie_embeddings": False, "bias": False}
max_tokens = 0
max_steps = 4_578  # 2,400,190,464 tokens
optimizer = "muon"
muon_lr = 0.02
muon_momentum = 0.95
embed_lr = 0.2
head_lr = 0.004
beta1 = 0.8
beta2 = 0.95
eps = 1e-10
weight_decay = 0.0
lr = 0.02  # with optimizer=muon, lr and min_lr set only the schedule's shape (every group's lr scales with it)
min_lr = 0.0
warmup_steps = 0
warmdown_frac = 1308 / 4578
