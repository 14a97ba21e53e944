#!/usr/bin/env bash
# Session 6, third lease: the pilot's data (200, best of 4), then the training stage on it twice, one after the other
# on the same GPU: the new gpu defaults for the bundled model, and today's (4-bit QLoRA, random order, cuDNN attention).
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 STAGE1_CACHE_DIR=/tmp/stage1_cache TOKENIZERS_PARALLELISM=false
m=/tmp/gemma.gguf R=/tmp/s8
mkdir -p $R/logs; T=$R/logs/timings.txt
timed() { local name=$1; shift; local s; s=$(date +%s); "$@" > $R/logs/$name.log 2>&1; local rc=$?; echo "$name rc=$rc seconds=$(( $(date +%s) - s ))" | tee -a $T; return $rc; }
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a $T
timed pilot python3 scripts/generate_stage1_pilot_data.py --count 200 --output $R/pilot --batch-size 256 --model $m --num-candidates 4 --no-progress || exit 1
for spec in "new:--quantization none --group-by-length --no-cudnn-attention" "base:"; do
  name=${spec%%:*}; read -r -a extra <<< "${spec#*:}"
  timed $name python3 scripts/train_stage1_sft.py --data $R/pilot/sft_data.jsonl --output $R/$name --epochs 3 --lr 5e-4 \
    --per-device-batch-size 8 --grad-accum 1 --model $m "${extra[@]}"
  grep -a 'done:' $R/logs/$name.log | tail -1
done
cd $R && tar czf $OUT/s8.tgz logs pilot/sft_data.jsonl pilot/session_manifest.json new/training_manifest.json new/loss_curve.png base/training_manifest.json base/loss_curve.png
ls -la $OUT
