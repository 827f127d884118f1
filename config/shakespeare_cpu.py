# CPU quickstart: a tiny GPT-2-shaped model on Tiny Shakespeare (GPT-2 BPE tokens) in a few minutes on 2 cores.
#   python prepare_data.py --dataset shakespeare        # -> data/shakespeare (297k train / 34k val tokens)
#   python train.py config/shakespeare_cpu.py
# The unigram baseline (predicting train-set token frequencies) is ~6.5 nats on val; this run ends well
# below it (tests/test_train.py checks a shortened run; README "Training" shows a full one).
data_dir = "data/shakespeare"
out_dir = "out/shakespeare_cpu"
model = "gpt2"
model_overrides = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "pad_vocab_multiple": 64}
micro_batch = 16
seq_len = 128
total_batch_tokens = 4096  # 16 x 128 x grad_accum 2 (one process); 300 steps = 1.2M tokens ~ 4 epochs
max_steps = 300
lr = 2e-3  # tiny models take a higher lr than GPT-2's 6e-4
min_lr = 2e-4
warmup_steps = 30
weight_decay = 0.1
dtype = "fp32"  # bf16 autocast is slower than fp32 on most CPUs
compile = False
eval_interval = 50
eval_iters = 10
log_interval = 10
ckpt_interval = 100
