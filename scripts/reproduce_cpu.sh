#!/usr/bin/env bash
# The Wikipedia pipeline of docs/reproduction_cpu.md, end to end on CPU:
#   prepare -> init checkpoints -> train baseline + doc_mask, 2 seeds each (same data, tokens, seeds)
#   -> eval_lm.py at max_length 512 and 1024 -> plot.py -> summary table.
#
#   bash scripts/reproduce_cpu.sh             # full: ~1 h per training run on 2 cores, 4 runs, then evaluation
#   bash scripts/reproduce_cpu.sh --smoke     # same steps on 1 of the 96 wiki files, a tiny model, a few steps,
#                                             # eval --limit 3: about a minute (tests/test_reproduction_smoke.py)
#
# Environment: OUT (default out/reproduction_cpu, smoke: out/reproduction_cpu_smoke), SHARED_DATA_DIR
# (the full-data mirror folder: corpus_wikipedia_en/ and the evaluation files, laid out as in tests/data;
# required for the full run, --smoke defaults to tests/data's samples), SEEDS (default "1337 1338"),
# TASKS (default hellaswag,lambada_openai,wikitext), EVAL_LIMIT (full default: none = whole tasks), HELLASWAG_LIMIT (full default: EVAL_LIMIT; its 10,042
# items take most of the evaluation time), LONG_TASKS (tasks re-run at max_length 1024, default wikitext: every
# hellaswag/lambada request fits in 512 tokens), TRAIN_OVERRIDES (extra train.py --key=value, e.g.
# "--max_steps=240 --warmup_steps=9"), PARALLEL (1: train a seed's baseline and doc_mask runs at the same
# time with OMP_NUM_THREADS=1 each (docs/reproduction_cpu.md has the measured throughput of both ways);
# losses equal the 2-thread run's to the printed digit), PYTHON (default python).
# Every step writes its files under $OUT; a step whose output exists is skipped, so a re-run resumes
# (delete $OUT to start again). Training runs resume from their last checkpoint (--init_from=auto).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/wiki_pipeline_args.sh "$@"  # --smoke, PYTHON, SHARED, WIKI
SEEDS=${SEEDS:-"1337 1338"}
TASKS=${TASKS:-hellaswag,lambada_openai,wikitext}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-disabled}

CONFIG=config/wikipedia_cpu.py
if [ "$SMOKE" = 1 ]; then
  OUT=${OUT:-out/reproduction_cpu_smoke}
  DATA="$OUT/data/wiki"
  PREP_ARGS=(--files "$WIKI/wiki_00" --val-docs 4)  # 1 of 96 files (~1%): ~66 articles, ~0.2M tokens
  # a tiny model and a few steps: the pipeline, not the result, is under test
  TRAIN_ARGS=(--model_overrides.n_layer=2 --model_overrides.n_head=2 --model_overrides.n_embd=32
              --micro_batch=2 --seq_len=64 --total_batch_tokens=128 --max_steps=4 --warmup_steps=1
              --eval_interval=2 --eval_tokens=256 --log_interval=1 --ckpt_interval=0)
  EVAL_LIMIT=${EVAL_LIMIT:-3}
  EVAL_LENGTHS="64"      # the smoke model's block_size is 1024, but 64 keeps wikitext's windows cheap
  EVAL_BATCH=8
else
  OUT=${OUT:-out/reproduction_cpu}
  DATA="data/wiki"
  # all 96 files; 1% of the articles (by a seeded hash) form the val split
  PREP_ARGS=(--files "$WIKI" --val-fraction 0.01)
  read -r -a TRAIN_ARGS <<< "${TRAIN_OVERRIDES:-}"
  EVAL_LIMIT=${EVAL_LIMIT:-}
  EVAL_LENGTHS="512 1024"
  EVAL_BATCH=16
fi
HELLASWAG_LIMIT=${HELLASWAG_LIMIT:-$EVAL_LIMIT}
LONG_TASKS=${LONG_TASKS:-wikitext}
PARALLEL=${PARALLEL:-0}
mkdir -p "$OUT"

# 1. data: WikiExtractor articles -> uint16 shards (title line kept: docs/data.md)
if [ ! -f "$DATA/meta.json" ]; then
  $PYTHON prepare_data.py "${PREP_ARGS[@]}" --out-dir "$DATA" --wiki-title keep --num-proc 2
fi

# 2. the model at initialisation (one per seed; doc_mask does not change the weights, only the attention mask)
for seed in $SEEDS; do
  if [ ! -f "$OUT/init_s$seed/ckpt.pt" ]; then
    $PYTHON train.py "$CONFIG" --data_dir="$DATA" --seed="$seed" "${TRAIN_ARGS[@]}" --out_dir="$OUT/init_s$seed" \
      --max_steps=0 --max_tokens=0 --eval_interval=0
  fi
done

# 3. training: baseline packing vs doc_mask=True, same data order, tokens and seed
train_run() {  # run seed extra-args...; one run at a time prints its log too, parallel runs only write it
  local run=$1 seed=$2 show=/dev/stdout; shift 2
  [ "$PARALLEL" = 1 ] && show=/dev/null
  $PYTHON train.py "$CONFIG" --data_dir="$DATA" --out_dir="$OUT/$run" --seed="$seed" --init_from=auto \
    "${TRAIN_ARGS[@]}" "$@" 2>&1 | tee -a "$OUT/$run.log" > "$show"
  touch "$OUT/$run/done"
}
runs=()
for seed in $SEEDS; do
  pids=()
  for variant in baseline doc_mask; do
    run="${variant}_s$seed"
    runs+=("$run")
    extra=()
    [ "$variant" = doc_mask ] && extra=(--model_overrides.doc_mask=True)
    [ -f "$OUT/$run/done" ] && continue
    echo "training $run (log: $OUT/$run.log)"
    if [ "$PARALLEL" = 1 ]; then
      OMP_NUM_THREADS=1 train_run "$run" "$seed" "${extra[@]}" &
      pids+=($!)
    else
      train_run "$run" "$seed" "${extra[@]}"
    fi
  done
  for pid in "${pids[@]}"; do
    wait "$pid" || { echo "error: a training run of seed $seed failed; see $OUT/*_s$seed.log" >&2; exit 1; }
  done
done

# 4. evaluation: lm-eval (local task variants), trained models and the init model. Files are
# eval/<run>_L<max_length>[_<part>].json; reproduction_summary.py merges the parts of one run and length.
evaluate() {  # run max_length tasks limit part
  local res="$OUT/eval/${1}_L$2$5.json" limit_args=()
  [ -n "$4" ] && limit_args=(--limit "$4")
  [ -f "$res" ] && return 0
  echo "evaluating $1 at max_length $2 on $3 (limit: ${4:-none})"
  $PYTHON eval_lm.py "$OUT/$1/ckpt.pt" --data-dir "$SHARED" --tasks "$3" --max-length "$2" \
    --batch-size "$EVAL_BATCH" --device cpu "${limit_args[@]}" --out "$res"
}
first_seed=${SEEDS%% *}
first_len=${EVAL_LENGTHS%% *}
rest=$(tr ',' '\n' <<< "$TASKS" | grep -vx hellaswag | paste -sd, || true)
for len in $EVAL_LENGTHS; do
  for run in "${runs[@]}" "init_s$first_seed"; do
    if [ "$len" = "$first_len" ]; then
      [ -n "$rest" ] && evaluate "$run" "$len" "$rest" "$EVAL_LIMIT" ""
      [[ ",$TASKS," == *,hellaswag,* ]] && evaluate "$run" "$len" hellaswag "$HELLASWAG_LIMIT" _hellaswag
    else
      evaluate "$run" "$len" "$LONG_TASKS" "$EVAL_LIMIT" ""
    fi
  done
done

# 5. learning curves and the summary table
$PYTHON plot.py "${runs[@]/#/$OUT/}" --out "$OUT/curves.png"
$PYTHON scripts/reproduction_summary.py "$OUT" | tee "$OUT/summary.md"
