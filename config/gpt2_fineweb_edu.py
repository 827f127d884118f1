# GPT-2 124M on FineWeb-edu sample-10BT, ~10B tokens: the same recipe as config/gpt2_owt.py (arithmetic,
# time estimates and memory notes there), only the data and the output names differ.
#   python prepare_data.py --dataset fineweb-edu --streaming  # -> data/fineweb_edu (~10B tokens)
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_fineweb_edu.py
from config.gpt2_owt import *  # noqa: F403

data_dir = "data/fineweb_edu"
out_dir = "out/gpt2_fineweb_edu"
wandb_run_name = "gpt2_fineweb_edu"
