# Architecture ablations, CPU-sized: the baseline every variant in this folder differs from.
# A tiny GPT-2 (the default GPTConfig parts: learned positions, pre-LayerNorm, GELU MLP, biases, tied
# embeddings) on Tiny Shakespeare, GPT-2 BPE tokens:
#   python prepare_data.py --dataset shakespeare
#   python train.py config/ablations/baseline.py
#   python train.py config/ablations/rope.py          # each variant file imports this one and changes 1-2 keys
# Every variant trains on the same data, tokens and seed. Tiny-scale differences do not predict 124M-scale ones.
# train.py prints the parameter count at start.
data_dir = "data/shakespeare"
out_dir = "out/ablations/baseline"
model = "gpt2"
model_overrides = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "pad_vocab_multiple": 64}
micro_batch = 16
seq_len = 128
total_batch_tokens = 4096
max_steps = 150  # 614k tokens (~2 epochs of the 297k-token train split)
lr = 2e-3  # tiny models take a higher lr than GPT-2's 6e-4
min_lr = 2e-4
warmup_steps = 15
weight_decay = 0.1
dtype = "fp32"  # bf16 autocast is slower than fp32 on most CPUs
compile = False
eval_interval = 25
eval_iters = 10
log_interval = 10
ckpt_interval = 0  # the final checkpoint is still written
seed = 1337
