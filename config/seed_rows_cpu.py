# The seed-pipeline study of docs/seed_pipeline.md on 2 CPU cores (scripts/seed_rows_study.sh): GPT-2's parts
# at 4 layers x 128 wide, rows of 512 tokens (the seed's max_length) so every arm trains on the same positions.
#   python train.py config/seed_rows_cpu.py --max_steps=320                                  # packed
#   python train.py config/seed_rows_cpu.py --max_steps=326 --rows=seed512                   # the seed's rows
# The script sets max_steps per arm so that every arm's loss sees the same number of targets (seed512 rows
# hold fewer real targets than packed ones: docs/seed_pipeline.md "Figures").
# Sizing (2-core VM, 2026-12-03, two runs at once with OMP_NUM_THREADS=1 each, 10-step probes of packed and
# seed512): 635-717 tok/s per run for this shape against 333-413 for config/wikipedia_cpu.py's 6 x 256, so
# 4 x 128 sees ~1.8x the tokens in the same time; at 320 steps x 2,048 tokens a run takes ~17 min.
data_dir = "data/wiki"
out_dir = "out/seed_rows_cpu"
model = "gpt2"
model_overrides = {"n_layer": 4, "n_head": 2, "n_embd": 128, "block_size": 1024, "pad_vocab_multiple": 64}
micro_batch = 4
seq_len = 512  # the seed's rows are at most 512 tokens; packed rows get the same length
total_batch_tokens = 2048  # 4 rows of 512, grad_accum 1: many small updates from few tokens
max_steps = 320
lr = 2e-3  # as the repository's other tiny configs
min_lr = 0.0
warmup_steps = 12  # 3.75% of 320, GPT-2 124M's fraction (700 / 19,074)
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.1
grad_clip = 1.0
dtype = "fp32"  # bit-reproducible on CPU
compile = False
eval_interval = 64
eval_tokens = 40_960  # 80 packed val rows of 512, the same rows for every arm
hellaswag_interval = 0
log_interval = 8
ckpt_interval = 64
seed = 1337
