#!/usr/bin/env bash
# Session 5 of 2026-11-27, on the 2-GPU machine: constraint variants.
#   r1: test set + pilot (GPU0); scale on 2 GPUs with --constraint-variants 2
#   r2: train lr 2e-4 (GPU0) || lr 5e-4 (GPU1), both --torch-compile regional (fallback: off, resumed)
#   r3: evaluate both (GPU0 || GPU1); Stage 2 pairs on the better adapter; DPO lr 5e-5 (GPU0) || 3e-4 (GPU1); evaluate both
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 STAGE1_CACHE_DIR=/tmp/stage1_cache NCCL_NVLS_ENABLE=0 TOKENIZERS_PARALLELISM=false
m=/tmp/gemma.gguf R=/tmp/r8 phase=$1
mkdir -p $R/logs
T=$R/logs/timings.txt
DEADLINE=$(( $(date +%s) + ${BUDGET:-570} ))
timed() {  # timed NAME GPUS cmd...
  local name=$1 gpus=$2; shift 2
  local s; s=$(date +%s)
  CUDA_VISIBLE_DEVICES=$gpus timeout $(( DEADLINE - $(date +%s) )) "$@" >> "$R/logs/$name.log" 2>&1
  local rc=$?
  echo "$name gpus=$gpus rc=$rc seconds=$(( $(date +%s) - s ))" | tee -a $T
  return $rc
}
pack() { tar czf $OUT/$phase.tgz -C $R logs $(cd $R && ls -d "$@" 2>/dev/null); ls -la $OUT; cat $T; }
train() {  # train NAME GPU extra flags...
  local name=$1 gpu=$2; shift 2
  timed $name $gpu python3 scripts/train_stage1_sft.py --data $R/scale/data.jsonl --output $R/$name --epochs 3 --model $m --resume \
    --per-device-batch-size 8 --grad-accum 1 --torch-compile regional "$@"
  local rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ ! -f $R/$name/final_adapter/TRAINING_SUCCESS ]; then
    echo "$name: compiled run failed (rc $rc); again without compile" | tee -a $T
    timed $name $gpu python3 scripts/train_stage1_sft.py --data $R/scale/data.jsonl --output $R/$name --epochs 3 --model $m --resume \
      --per-device-batch-size 8 --grad-accum 1 --allow-changed-hyperparameters "$@"
  fi
}
evaluate() {  # evaluate NAME GPU adapter [reference]
  local name=$1 gpu=$2 adapter=$3; shift 3
  timed $name $gpu python3 scripts/evaluate_stage1_sft.py --sft-checkpoint $adapter --test-set $R/data/test_instructions.jsonl \
    --output $R/$name --batch-size 256 --no-progress "$@"
}
case $phase in
r1)
  nvidia-smi --query-gpu=name,memory.total --format=csv
  timed testset 0 python3 scripts/generate_test_instructions.py --count 200 --output $R/data/test_instructions.jsonl
  timed pilot 0 python3 scripts/generate_stage1_pilot_data.py --count 200 --output $R/pilot --batch-size 256 --model $m --no-progress \
    --num-candidates 4 || { pack pilot data; exit 1; }
  timed scale 0,1 torchrun --standalone --nproc-per-node 2 scripts/generate_stage1_scale_data.py --pilot-manifest $R/pilot/session_manifest.json \
    --count 2000 --num-shards 4 --batch-size 256 --exclude-test-set $R/data/test_instructions.jsonl --no-progress --output $R/scale/data.jsonl \
    --constraint-variants 2
  sha256sum $R/scale/data.jsonl | tee -a $T
  pack pilot/session_manifest.json pilot/probe.json scale/data.jsonl scale/data.manifest.json data ;;
r2)
  train trainA 0 &
  train trainB 1 --lr 5e-4 --allow-changed-hyperparameters &
  wait
  pack trainA/training_manifest.json trainA/loss_curve.png trainB/training_manifest.json trainB/loss_curve.png ;;
r3)
  evaluate evalA 0 $R/trainA/final_adapter &
  evaluate evalB 1 $R/trainB/final_adapter &
  wait
  best=$(python3 -c "
import json
a=json.load(open('$R/evalA/evaluation_results.json')); b=json.load(open('$R/evalB/evaluation_results.json'))
s=lambda r: r['statistics']['overall']['sft']['successes']
print('A' if s(a) >= s(b) else 'B')" 2>>$T || echo A)
  echo "stage2 on adapter $best" | tee -a $T
  timed s2pairs 0 python3 scripts/generate_stage2_preference_data.py --stage1-evaluation $R/eval$best/evaluation_results.json \
    --stage1-adapter $R/train$best/final_adapter --output $R/s2pairs --num-instructions 1000 --num-candidates 4 --batch-size 256 --no-progress
  for lr in 5e-5 3e-4; do
    g=$([ $lr = 5e-5 ] && echo 0 || echo 1)
    ( timed dpo$lr $g python3 scripts/train_stage2_dpo.py --pairs $R/s2pairs/preference_pairs.jsonl --output $R/dpo$lr --epochs 1 --resume \
        --per-device-batch-size 8 --grad-accum 1 --lr $lr && \
      evaluate s2eval$lr $g $R/dpo$lr/final_adapter --reference-checkpoint $R/train$best/final_adapter ) &
  done
  wait
  pack evalA evalB s2pairs/session_manifest.json dpo5e-5/training_manifest.json dpo3e-4/training_manifest.json dpo5e-5/final_adapter/dpo_curves.png \
    dpo3e-4/final_adapter/dpo_curves.png s2eval5e-5 s2eval3e-4 ;;
esac
