# CPU quickstart: a tiny GPT-2-shaped model on Tiny Shakespeare (GPT-2 BPE tokens) in a few minutes on 2 cores.
# With the 50257-token vocabulary, the output layer and its (tokens x 50304) logits dominate a step, so a
# wider body (n_embd 128) costs little more than a narrower one.
#   python prepare_data.py --dataset shakespeare        # -> data/shakespeare (297k train / 34k val tokens)
#   python train.py config/shakespeare_cpu.py
# The unigram baseline (predicting train-set token frequencies) is ~6.5 nats on val; this run ends well
# below it (tests/test_fresh_clone.py checks a shortened run; README "CPU quickstart" shows a full one).
data_dir = "data/shakespeare"
out_dir = "out/shakespeare_cpu"
model = "gpt2"
model_overrides = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "pad_vocab_multiple": 64}
micro_batch = 16
seq_len = 128
total_batch_tokens = 2048  # 16 x 128, grad_accum 1 on one process; 200 steps = 410k tokens ~ 1.4 epochs
max_steps = 200
lr = 2e-3  # tiny models take a higher lr than GPT-2's 6e-4
min_lr = 2e-4
warmup_steps = 20
weight_decay = 0.1
dtype = "fp32"  # exact and bit-reproducible on CPU
compile = False
eval_interval = 50
eval_tokens = 20_480  # 160 rows of 128 tokens, the same for every micro_batch
log_interval = 10
ckpt_interval = 100
