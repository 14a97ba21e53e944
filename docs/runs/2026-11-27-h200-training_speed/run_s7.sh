#!/usr/bin/env bash
# Session 6 of 2026-11-27, second lease: step benchmark with and without cuDNN attention, then the whole gpu
# profile through run_stage1.sh (the bundled model as the driver finds it), then today's training step
# (4-bit QLoRA, 8 x 1, cuDNN on, random order) for one epoch on the same data.
#   start: bench, decide --no-cudnn-attention, launch the driver in the background
#   poll SECONDS MARKER; base: launch the baseline epoch; pack NAME
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 STAGE1_CACHE_DIR=/tmp/stage1_cache TOKENIZERS_PARALLELISM=false STAGE1_SKIP_INSTALL=1
mkdir -p /tmp/bin && rm -f /tmp/bin/python && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > /tmp/bin/python && chmod +x /tmp/bin/python && export PATH=/tmp/bin:$PATH
R=/tmp/s7 phase=$1; shift
mkdir -p $R/logs
T=$R/logs/timings.txt
case $phase in
start)
  mkdir -p $STAGE1_CACHE_DIR/gguf && cp /tmp/gemma.gguf $STAGE1_CACHE_DIR/gguf/gemma-3-270m-q4_k_m.gguf
  nvidia-smi --query-gpu=name --format=csv,noheader | tee -a $T
  python3 scripts/benchmark_training.py --models bundled --configurations plain no_cudnn_attention lean_16bit \
    --steps 24 --warmup-steps 6 --output $R/bench_s7.json 2>&1 | grep -v '%|' | tail -6 | tee -a $T
  cp $R/bench_s7.json $OUT/
  args="--per-device-batch-size 8 --grad-accum 1 --group-by-length"
  python3 -c "
import json,sys; rows={r['configuration']: r for r in json.load(open('$R/bench_s7.json'))['rows']}
sys.exit(0 if rows['no_cudnn_attention']['tokens_per_s'] >= rows['plain']['tokens_per_s'] else 1)" && args="$args --no-cudnn-attention"
  echo "TRAIN_ARGS=$args" | tee -a $T
  ;;
driver)
  args="--per-device-batch-size 8 --grad-accum 1 --group-by-length --no-cudnn-attention"
  s=$(date +%s)
  setsid nohup bash -c "TRAIN_ARGS='$args' bash scripts/run_stage1.sh --profile gpu --root $R > $R/logs/driver.log 2>&1; echo \"driver rc=\$? seconds=\$(( \$(date +%s) - $s ))\" >> $T; echo DRIVER_DONE >> $T" > /dev/null 2>&1 < /dev/null &
  sleep 3; tail -3 $R/logs/driver.log ;;
poll)
  limit=${1:-540}; marker=${2:-DONE}; s=$(date +%s)
  while [ $(( $(date +%s) - s )) -lt $limit ] && ! grep -q "$marker" $T 2>/dev/null; do sleep 10; done
  cat $T; grep -a '=== ' $R/logs/driver.log | tail -8; for f in $R/logs/base.log; do [ -f $f ] && tail -c 400 $f; done
  tail -c 300 $R/logs/driver.log; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv ;;
base)
  s=$(date +%s)
  setsid nohup bash -c "python3 scripts/train_stage1_sft.py --data $R/data/stage1_sft_data.jsonl --output $R/base --epochs 3 --max-steps 637 --lr 5e-4 --per-device-batch-size 8 --grad-accum 1 > $R/logs/base.log 2>&1; echo \"base rc=\$? seconds=\$(( \$(date +%s) - $s ))\" >> $T; echo BASE_DONE >> $T" > /dev/null 2>&1 < /dev/null &
  sleep 3; cat $T ;;
pack)
  cd $R && tar czf $OUT/s7_$1.tgz logs bench_s7.json $(ls -d data/stage1_sft_data.jsonl data/stage1_sft_data.manifest.json data/test_instructions.jsonl artifacts/pilot/session_manifest.json checkpoints/stage1_sft/training_manifest.json checkpoints/stage1_sft/loss_curve.png base/training_manifest.json results/sft_eval/evaluation_results.json results/sft_eval/evaluation_summary.txt results/sft_eval/sft_responses.jsonl 2>/dev/null); ls -la $OUT ;;
esac
