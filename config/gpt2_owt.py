# GPT-2 124M on OpenWebText, ~10B tokens (the llm.c / build-nanogpt recipe).
#   python prepare_data.py                                   # -> data/openwebtext (~9B train tokens)
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_owt.py
#
# Arithmetic:
#   tokens/step  = total_batch_tokens = 524,288 = 2**19 (GPT-3 small's ~0.5M), reached as
#                  micro_batch 32 x seq_len 1024 x world_size 8 x grad_accum 2 (grad_accum is derived:
#                  16 on 1 GPU, 4 on 4 GPUs, 2 on 8 GPUs).
#   steps        = ceil(10e9 / 524,288) = 19,074 (max_tokens below); warmup 700 steps, cosine to min_lr 0.
#   FLOPs        = 6N + 12*L*T*d per token (model.estimate_flops_per_token) = 0.855 GFLOP/token
#                  -> 8.55e18 FLOPs for 10B tokens.
#   Time (ESTIMATES, not measured here: dense bf16 peak x an assumed 40% MFU):
#                  H100/H200 (989 TFLOP/s): ~6.0 h on 1 GPU, ~45 min on 8
#                  A100 (312 TFLOP/s):      ~19 h on 1 GPU, ~2.4 h on 8
#   micro_batch 32 at seq 1024 needs roughly 40 GB with bf16 autocast; use 16 (or 8) on 24-40 GB cards.
data_dir = "data/openwebtext"
out_dir = "out/gpt2_owt"
model = "gpt2"
model_overrides = {"pad_vocab_multiple": 64}  # 50304 embedding rows: faster matmuls, the same model
micro_batch = 32
seq_len = 1024
total_batch_tokens = 524_288
max_tokens = 10_000_000_000
lr = 6e-4
min_lr = 0.0
warmup_steps = 700
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.1
grad_clip = 1.0
dtype = "bf16"
compile = True
zero1 = True
eval_interval = 250
eval_tokens = 655_360  # 20 x 32 x 1024: the same val tokens for every micro_batch and world size
hellaswag_interval = 0  # e.g. 1000 with eval_hellaswag.py's data to track HellaSwag while training
log_interval = 10
ckpt_interval = 1000
wandb_log = False
wandb_project = "gpt2"
wandb_run_name = "gpt2_owt"
