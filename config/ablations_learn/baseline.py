# Architecture ablations at a scale where the models learn: the baseline every variant in this folder differs from.
# The CPU quickstart's model (config/shakespeare_cpu.py: 4 layers, 4 heads, n_embd 128, seq 128, GPT-2 parts:
# learned positions, pre-LayerNorm, GELU MLP, biases, tied embeddings) for 100 steps of 1024 tokens (102k tokens),
# which ends well below the unigram level (~6.5 nats) where config/ablations/ (d=64, 51k tokens) stops. Half the
# quickstart's batch: at this budget more, smaller steps learn more per token (20 steps: val 6.96 after 20k tokens
# with 1024-token steps, 6.94 after 41k with 2048) for the same compute. Measured run times: docs/ablations_cpu.md.
#   python prepare_data.py --dataset shakespeare
#   python ablate.py --preset learn --jobs 2           # every variant, several seeds each -> docs/ablations_cpu.md
# Each variant file imports this one and changes a few keys (modern.py and muon.py: the optimizer too).
# Tiny-scale differences do not predict 124M-scale ones.
data_dir = "data/shakespeare"
out_dir = "out/ablations_learn/baseline"
model = "gpt2"
model_overrides = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "pad_vocab_multiple": 64}
micro_batch = 8
seq_len = 128
total_batch_tokens = 1024  # 8 x 128, one micro-batch per step on one process
max_steps = 100  # 102k tokens, ~0.34 epoch of the 297k-token train split: no token is seen twice
lr = 2e-3  # tiny models take a higher lr than GPT-2's 6e-4
min_lr = 2e-4
warmup_steps = 10
weight_decay = 0.1
dtype = "fp32"  # exact and bit-reproducible on CPU
compile = False
eval_interval = 20  # 6 points per val curve (token efficiency interpolates between them); each costs ~3 steps
eval_tokens = 10_240  # 80 rows of 128 tokens, the same rows at every evaluation and for every variant
log_interval = 10
ckpt_interval = 50  # a stopped sweep resumes from here; the final checkpoint is always written
seed = 1337
