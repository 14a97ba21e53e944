#!/usr/bin/env bash
# Session 6 of 2026-11-27, one H100: training speed on real data (issue 18).
#   bench: benchmark_training rows (alone on the GPU)
#   gen:   test set + pilot + scale exactly as run_stage1.sh --profile gpu (background)
#   train FASTARGS...: the driver's train stage with the fast flags || the baseline (today's gpu profile), then evaluate both (background)
#   poll SECONDS: wait for the background job, print progress; pack outputs
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 STAGE1_CACHE_DIR=/tmp/stage1_cache TOKENIZERS_PARALLELISM=false
m=/tmp/gemma.gguf R=/tmp/s6 phase=$1; shift
mkdir -p $R/logs
T=$R/logs/timings.txt
timed() {  # timed NAME cmd...
  local name=$1; shift
  local s; s=$(date +%s)
  "$@" >> "$R/logs/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - s ))" | tee -a $T
  return $rc
}
case $phase in
bench)
  nvidia-smi --query-gpu=name,memory.total --format=csv
  python3 scripts/benchmark_training.py --models bundled --bundled-model $m --configurations plain lora_16bit fast_16bit eager_16bit \
    --steps 24 --warmup-steps 6 --profile eager_16bit --output $OUT/bench_s6.json 2>&1 | tail -25 ;;
gen)
  setsid nohup bash -c "
    timed() { :; }
    cd $PWD
    s=\$(date +%s); python3 scripts/generate_test_instructions.py --count 200 --output $R/data/test_instructions.jsonl > $R/logs/testset.log 2>&1; echo \"testset rc=\$? seconds=\$(( \$(date +%s) - s ))\" >> $T
    s=\$(date +%s); python3 scripts/generate_stage1_pilot_data.py --count 200 --output $R/pilot --batch-size 256 --model $m --num-candidates 4 --no-progress > $R/logs/pilot.log 2>&1; echo \"pilot rc=\$? seconds=\$(( \$(date +%s) - s ))\" >> $T
    s=\$(date +%s); python3 scripts/generate_stage1_scale_data.py --pilot-manifest $R/pilot/session_manifest.json --count 2000 --num-shards 4 --output $R/data/stage1_sft_data.jsonl --batch-size 256 --exclude-test-set $R/data/test_instructions.jsonl --no-progress > $R/logs/scale.log 2>&1; echo \"scale rc=\$? seconds=\$(( \$(date +%s) - s ))\" >> $T
    echo GEN_DONE >> $T" > /dev/null 2>&1 < /dev/null &
  sleep 5; cat $T ;;
train)
  specs=("$@")  # NAME:flag,flag,...
  setsid nohup bash -c "
    cd $PWD
    run() { local name=\$1; shift; local s=\$(date +%s); python3 scripts/train_stage1_sft.py --data $R/data/stage1_sft_data.jsonl --output $R/\$name --epochs 3 --lr 5e-4 --model $m --resume \"\$@\" > $R/logs/\$name.log 2>&1; echo \"\$name rc=\$? seconds=\$(( \$(date +%s) - s ))\" >> $T
      s=\$(date +%s); python3 scripts/evaluate_stage1_sft.py --sft-checkpoint $R/\$name/final_adapter --test-set $R/data/test_instructions.jsonl --output $R/eval_\$name --batch-size 256 --no-progress > $R/logs/eval_\$name.log 2>&1; echo \"eval_\$name rc=\$? seconds=\$(( \$(date +%s) - s ))\" >> $T; }
    for spec in ${specs[*]}; do run \${spec%%:*} --per-device-batch-size 8 --grad-accum 1 \$(echo \${spec#*:} | tr , ' ') & done
    wait; echo TRAIN_DONE >> $T" > /dev/null 2>&1 < /dev/null &
  sleep 5; cat $T ;;
poll)
  limit=${1:-540}; marker=${2:-DONE}; s=$(date +%s)
  while [ $(( $(date +%s) - s )) -lt $limit ] && ! grep -q "$marker" $T 2>/dev/null; do sleep 10; done
  cat $T; for f in $R/logs/*.log; do echo "== $f"; tail -3 $f | cut -c1-300; done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv ;;
pack)
  cd $R && tar czf $OUT/s6_$1.tgz logs $(ls -d data/stage1_sft_data.manifest.json pilot/session_manifest.json */training_manifest.json */loss_curve.png eval_*/evaluation_results.json eval_*/evaluation_summary.txt eval_*/sft_responses.jsonl eval_*/base_responses.jsonl 2>/dev/null); ls -la $OUT ;;
esac
