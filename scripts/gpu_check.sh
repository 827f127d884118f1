#!/usr/bin/env bash
# GPU check, sized for ~11 minutes on one H100/H200 (the device tool's 15-minute budget minus start-up).
# Run from the repository root on the GPU machine; everything it prints and writes goes to $OUT (default
# out/gpu_check). Steps, each under its own `timeout` so one hang cannot eat the budget:
#   1. environment: nvidia-smi, torch/CUDA versions; installs carried wheels (pytest, flash-attn) if needed
#   2. bench.py on GPT-2 124M, T=1024, bf16: plain loop, eager (and eager with one fast path off at a time),
#      compiled, batch 16 and 64, with the measured matmul ceiling and a torch.profiler table;
#      $OUT/summary.txt (scripts/gpu_summary.py)                                                        ~5.5 min
#   3. unit tests that need CUDA (bf16/fp16 autocast, SDPA flash kernel vs manual, flash-attn package, fused
#      AdamW, TF32, no host-device sync in the step, torch.compile vs eager) + bench.py's own tests   ~3 min
#   4. a 2-minute real training run (train.py) of GPT-2 124M on Tiny Shakespeare, printing tok/s and MFU
#   5. only if under 7 minutes have passed: compiled with CUDA graphs (reduce-overhead), B=64
# The figures come first, so a run cut short by the device limit still returns them.
#
# Preparing the carry on the CPU machine (the GPU machine has no network and no datasets/lm-eval/wandb):
#   python prepare_data.py --dataset shakespeare                      # -> data/shakespeare (ignored by git)
#   pip download pytest --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d out/wheels
#   run(command="bash scripts/gpu_check.sh bench", timeout_s=600)
#   run(command="bash scripts/gpu_check.sh tests train", carry=["data/shakespeare", "out/wheels"], timeout_s=600)
# Then copy the figures from $OUT/summary.txt and $OUT/train.log into docs/performance.md.
# Phases: `bash scripts/gpu_check.sh [bench] [tests] [train]` (default: all three, ~11 min). The device tool
# allows 10 minutes per command, so with it run two calls: `... gpu_check.sh bench` then `... tests train`.
set -uo pipefail
cd "$(dirname "$0")/.."
PHASES="${*:-bench tests train}"
want() { [[ " $PHASES " == *" $1 "* ]]; }
OUT="${OUT:-out/gpu_check}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
WHEELS="${WHEELS:-out/wheels}"
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/steps.log"; }

stamp "1. environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.csv"
python -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', \
torch.version.cuda, '|', torch.cuda.get_device_name(0))" | tee "$OUT/versions.txt"
if ! python -c "import pytest" 2>/dev/null; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    python -m pip install --quiet --no-index --find-links "$WHEELS" pytest 2>&1 | tail -3
  else
    echo "pytest is missing and no wheels in $WHEELS: unit tests will be skipped (see the header)"
  fi
fi
if compgen -G "$WHEELS/flash_attn-*.whl" >/dev/null && ! python -c "import flash_attn" 2>/dev/null; then
  python -m pip install --quiet --no-index --find-links "$WHEELS" flash-attn 2>&1 | tail -3
fi

bench() {  # bench NAME ARGS...: one bench.py run, its log and JSON under $OUT
  local name=$1; shift
  stamp "bench $name: $*"
  timeout 150 python bench.py --seq-len 1024 --dtype bf16 --steps 20 --measure-ceiling "$@" \
    --json "$OUT/bench_$name.json" 2>&1 | tee "$OUT/bench_$name.log" | grep -v "^ *$" | tail -9
}
if want bench; then
  stamp "2. bench.py, GPT-2 124M, T=1024, bf16"
  bench plain_b16 --batch-size 16 --plain
  bench eager_b16 --batch-size 16
  bench eager_b16_foreach_adamw --batch-size 16 --fused-adamw off  # one fast path off at a time
  bench eager_b16_unpadded_vocab --batch-size 16 --pad-vocab off
  bench eager_b16_manual_attention --batch-size 16 --attention manual
  bench compiled_b16 --batch-size 16 --compile
  bench eager_b64 --batch-size 64
  bench compiled_b64 --batch-size 64 --compile --profile
  python scripts/gpu_summary.py "$OUT"/bench_*.json | tee "$OUT/summary.txt"
fi


if ! want tests; then :
elif python -c "import pytest" 2>/dev/null; then
  stamp "3. unit tests (CUDA fast paths, attention kernels, bench)"
  timeout 200 python -m pytest -q -rs tests/test_fast_paths.py tests/test_attention.py tests/test_bench.py 2>&1 | tee "$OUT/pytest.log" | tail -25
else
  echo "skipped: no pytest" | tee "$OUT/pytest.log"
fi

if ! want train; then :
elif [ -f data/shakespeare/meta.json ]; then
  stamp "4. 2-minute training run: GPT-2 124M on Tiny Shakespeare (train.py, compiled, bf16)"
  # SIGTERM after 120 s: train.py finishes its step, writes a checkpoint and exits 0.
  timeout --signal=TERM --kill-after=60 120 python train.py --data_dir=data/shakespeare \
    --out_dir="$OUT/train_shakespeare" --model=gpt2 --model_overrides.pad_vocab_multiple=64 --micro_batch=16 \
    --seq_len=1024 --total_batch_tokens=65536 --max_steps=5000 --lr=6e-4 --warmup_steps=20 --dtype=bf16 \
    --compile=true --eval_interval=0 --ckpt_interval=0 --log_interval=5 2>&1 | tee "$OUT/train.log" | tail -15
  rm -f "$OUT/train_shakespeare/ckpt.pt"  # 1.5 GB of weights + AdamW state: not worth fetching
else
  echo "skipped: data/shakespeare/meta.json not carried (see the header)" | tee "$OUT/train.log"
fi

if want bench && (( $(date +%s) - T0 < 420 )); then  # time left: CUDA graphs (compile mode reduce-overhead)
  stamp "5. extra: CUDA graphs"
  bench cudagraphs_b64 --batch-size 64 --compile --compile-mode reduce-overhead
  python scripts/gpu_summary.py "$OUT"/bench_*.json | tee "$OUT/summary.txt"
fi
stamp "done"
