#!/usr/bin/env bash
# The seed-pipeline study of docs/seed_pipeline.md: does the seed's way of making rows explain its gap?
# Four arms on the Wikipedia extract, the same seeds, the same number of targets seen by the loss:
#   packed            today's rows: packed 512-token rows cut from the token stream
#   seed512           the seed's rows: per-document 512-token windows, >= 256-token filter, EOS padding masked
#   seed512_nofilter  the seed's rows without the length filter (seed_min_tokens=0)
#   packed_filtered   packed rows made of the tokens seed512 keeps (the filter without the row format)
# and, on request (ARMS=...), the other reading of the seed's collator:
#   seed512_padloss   seed512 with the loss also on the EOS padding (seed_loss_on_padding=true); the same
#                     steps and rows as seed512, so it differs from it in the padding targets alone
# then lm-eval lambada_openai + wikitext at max_length 512 on each model and the summary (table + curves).
#
#   bash scripts/seed_rows_study.sh            # 8 runs of ~17 min, two at a time, + ~3 min of lm-eval each
#   bash scripts/seed_rows_study.sh --smoke    # the same steps on tests/data, a tiny model, eval --limit 3
#
# Environment: OUT (default out/seed_rows_study, smoke: out/seed_rows_study_smoke), SHARED_DATA_DIR (the
# full-data mirror: corpus_wikipedia_en/ and the evaluation files, laid out as in tests/data; required for the
# full study), SEEDS (default "1337 1338"), ARMS (default all four, in the order above), LOSS_TOKENS (targets
# the loss sees per run, default 655,360 = packed's 320 steps x 2,048), EVAL_LIMIT (default: whole tasks),
# PARALLEL (default 1: one worker per seed at once, OMP_NUM_THREADS=1 each), PYTHON (default python).
# A step whose output exists is skipped and training resumes from its checkpoint, so a re-run continues.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/wiki_pipeline_args.sh "$@"  # --smoke, PYTHON, SHARED, WIKI
SEEDS=${SEEDS:-"1337 1338"}
ARMS=${ARMS:-"packed seed512 seed512_nofilter packed_filtered"}
PARALLEL=${PARALLEL:-1}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-disabled}

CONFIG=config/seed_rows_cpu.py
if [ "$SMOKE" = 1 ]; then
  OUT=${OUT:-out/seed_rows_study_smoke}
  DATA="$OUT/data/wiki"
  PREP_ARGS=(--files "$WIKI" --val-docs 4)
  TRAIN_ARGS=(--model_overrides.n_layer=1 --model_overrides.n_head=1 --model_overrides.n_embd=32
              --micro_batch=1 --total_batch_tokens=512 --warmup_steps=1 --eval_interval=2 --eval_tokens=512
              --log_interval=1 --ckpt_interval=0)
  LOSS_TOKENS=${LOSS_TOKENS:-1536}
  EVAL_LIMIT=${EVAL_LIMIT:-3}
else
  OUT=${OUT:-out/seed_rows_study}
  DATA="data/wiki"
  PREP_ARGS=(--files "$WIKI" --val-fraction 0.01)  # the split of docs/reproduction_cpu.md
  TRAIN_ARGS=()
  LOSS_TOKENS=${LOSS_TOKENS:-655360}
  EVAL_LIMIT=${EVAL_LIMIT:-}
fi
mkdir -p "$OUT/eval"

# 1. data: WikiExtractor articles -> uint16 shards, title line kept
if [ ! -f "$DATA/meta.json" ]; then
  $PYTHON prepare_data.py "${PREP_ARGS[@]}" --out-dir "$DATA" --wiki-title keep --num-proc 2
fi

arm_args() {  # the train.py overrides that make an arm
  case "$1" in
    packed) ;;
    seed512) echo --rows=seed512 ;;
    seed512_nofilter) echo --rows=seed512 --seed_min_tokens=0 ;;
    packed_filtered) echo --rows=packed_filtered ;;
    seed512_padloss) echo --rows=seed512 --seed_loss_on_padding=true ;;
    *) echo "error: unknown arm $1 (packed, seed512, seed512_nofilter, packed_filtered, seed512_padloss)" >&2
       return 2 ;;
  esac
}

# 2. one worker per seed: train each arm, then score it with lm-eval (lambada_openai + wikitext at 512)
run_arm() {  # arm seed
  local arm=$1 seed=$2 run="$1_s$2" steps extra
  read -r -a extra <<< "$(arm_args "$arm")"
  steps=$($PYTHON scripts/seed_rows_study.py steps --loss-tokens "$LOSS_TOKENS" "$CONFIG" --data_dir="$DATA" \
    "${TRAIN_ARGS[@]}" "${extra[@]}")
  if [ ! -f "$OUT/$run/done" ]; then
    echo "training $run: $steps steps (log: $OUT/$run.log)"
    $PYTHON train.py "$CONFIG" --data_dir="$DATA" --out_dir="$OUT/$run" --seed="$seed" --init_from=auto \
      --max_steps="$steps" "${TRAIN_ARGS[@]}" "${extra[@]}" >> "$OUT/$run.log" 2>&1
    touch "$OUT/$run/done"
  fi
  local res="$OUT/eval/${run}_L512.json" limit_args=()
  [ -n "$EVAL_LIMIT" ] && limit_args=(--limit "$EVAL_LIMIT")
  if [ ! -f "$res" ]; then
    echo "evaluating $run (log: $OUT/eval/$run.log)"
    $PYTHON eval_lm.py "$OUT/$run/ckpt.pt" --data-dir "$SHARED" --tasks lambada_openai,wikitext --max-length 512 \
      --batch-size 16 --device cpu "${limit_args[@]}" --log-samples --out "$res" > "$OUT/eval/$run.log" 2>&1
  fi
}
worker() {  # seed
  for arm in $ARMS; do run_arm "$arm" "$1"; done
}
pids=()
for seed in $SEEDS; do
  if [ "$PARALLEL" = 1 ]; then
    OMP_NUM_THREADS=1 worker "$seed" &
    pids+=($!)
  else
    worker "$seed"
  fi
done
for pid in "${pids[@]}"; do
  wait "$pid" || { echo "error: a worker failed; see the logs under $OUT" >&2; exit 1; }
done

# 3. the table (means, differences against packed, seed-to-seed spread) and the curves
$PYTHON scripts/seed_rows_study.py summary "$OUT" --arms $ARMS --seeds $SEEDS --plot "$OUT/curves.png" | tee "$OUT/summary.md"
