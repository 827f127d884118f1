# Architecture ablations, CPU-sized: the baseline every variant in this folder differs from.
# A tiny GPT-2 (the default GPTConfig parts: learned positions, pre-LayerNorm, GELU MLP, biases, tied
# embeddings) on Tiny Shakespeare, GPT-2 BPE tokens:
#   python prepare_data.py --dataset shakespeare
#   python train.py config/ablations/baseline.py
#   python train.py config/ablations/rope.py          # each variant imports this file and overrides what it names
#                                                      # (most: one model key; llama_like and modern: several)
#   python ablate.py --preset cpu                      # all of them, then a results table + val-loss plot
# Every variant trains on the same data, tokens and seed. Tiny-scale differences do not predict 124M-scale ones.
# train.py prints the parameter count at start.
data_dir = "data/shakespeare"
out_dir = "out/ablations/baseline"
model = "gpt2"
# Sized so the whole preset (13 variants + a second baseline seed, `python ablate.py --preset cpu`) fits ~20 min
# on 2 CPU cores: with the 50304-row output layer taking ~90% of the FLOPs, n_embd 64 halves a step's cost.
model_overrides = {"n_layer": 4, "n_head": 4, "n_embd": 64, "block_size": 64, "pad_vocab_multiple": 64}
micro_batch = 8
seq_len = 64
total_batch_tokens = 512  # small batches: more updates from the few tokens a CPU can afford
max_steps = 100  # 51k tokens (~0.17 epoch of the 297k-token train split)
lr = 2e-3  # tiny models take a higher lr than GPT-2's 6e-4
min_lr = 2e-4
warmup_steps = 10
weight_decay = 0.1
dtype = "fp32"  # bit-reproducible on CPU; bf16 autocast was no faster beyond noise (docs/reproduction_cpu.md)
compile = False
eval_interval = 20
eval_tokens = 4096  # 64 rows of 64 tokens, the same rows at every evaluation and for every variant
log_interval = 5
ckpt_interval = 0  # the final checkpoint is still written
seed = 1337
