#!/usr/bin/env bash
# Session 7, second lease: --cuda-graphs without per-step syncs (token count summed on the device, non-blocking batch copies). The training stage on the pilot's 566 records (session 6's pilot, byte-identical), three
# ways one after the other on the same GPU: graphed (16-bit + length groups + no cuDNN attention + CUDA graphs), lean
# (the same without graphs: today's driver gpu defaults) and today's 4-bit step; then the step benchmark.
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 STAGE1_CACHE_DIR=/tmp/stage1_cache TOKENIZERS_PARALLELISM=false
m=/tmp/gemma.gguf R=/tmp/g2
mkdir -p $R/logs /tmp/s8/pilot; T=$R/logs/timings.txt
cp .device/pilotdata/* /tmp/s8/pilot/
# Only the data travelled: the manifest keeps the one output the gate needs (its sha256 unchanged).
python3 -c "import json;p='/tmp/s8/pilot/session_manifest.json';m=json.load(open(p));m['outputs']={'data':m['outputs']['data']};json.dump(m,open(p,'w'))"
rm -rf $R/graphed $R/lean $R/base $R/bench; : > $T
timed() { local name=$1; shift; local s; s=$(date +%s); "$@" > $R/logs/$name.log 2>&1; local rc=$?; echo "$name rc=$rc seconds=$(( $(date +%s) - s ))" | tee -a $T; return $rc; }
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a $T
lean="--quantization none --group-by-length --no-cudnn-attention"
for spec in "graphed:$lean --cuda-graphs" "lean:$lean" "base:"; do
  name=${spec%%:*}; read -r -a extra <<< "${spec#*:}"
  timed $name python3 scripts/train_stage1_sft.py --data /tmp/s8/pilot/sft_data.jsonl --output $R/$name --epochs 3 --lr 5e-4 \
    --per-device-batch-size 8 --grad-accum 1 --model $m "${extra[@]}"
  grep -a 'done:\|CUDA graphs' $R/logs/$name.log | tail -2
  python3 -c "import json,sys;m=json.load(open('$R/$name/training_manifest.json'));print('$name', m['tokens_per_second'], m['train_seconds'], m['final_eval_loss'])" | tee -a $T
done
timed bench python3 scripts/benchmark_training.py --models bundled --bundled-model $m --steps 32 --warmup-steps 8 \
  --configurations plain lean_16bit graphed_16bit graphed_4bit --profile graphed_16bit --output $R/bench/bt.json
tail -12 $R/logs/bench.log | tee -a $T
cd $R && tar czf $R/g2.tgz logs bench */training_manifest.json */loss_curve.png
ls -la $R
