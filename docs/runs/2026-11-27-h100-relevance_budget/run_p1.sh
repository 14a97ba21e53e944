#!/usr/bin/env bash
# Session 7, fourth lease: the pilot stage twice on one H100: the relevance scorer's GPU logit budget (new), then the
# same code with the scorer's file as committed before it (old: 2^27 logits a forward pass).
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 STAGE1_CACHE_DIR=/tmp/stage1_cache TOKENIZERS_PARALLELISM=false
R=/tmp/p1; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | tee $R/timings.txt
python3 scripts/generate_test_instructions.py --count 200 --output $R/test.jsonl > /dev/null 2>&1
for name in new old; do
  [ $name = old ] && cp .device/instruction_critic_old.py scripts/utils/instruction_critic.py
  s=$(date +%s)
  python3 scripts/generate_stage1_pilot_data.py --count 200 --output $R/$name --batch-size 256 --model /tmp/gemma.gguf --num-candidates 4 --no-progress > $R/$name.log 2>&1
  echo "$name rc=$? seconds=$(( $(date +%s) - s ))" | tee -a $R/timings.txt
  python3 -c "import json;m=json.load(open('$R/$name/session_manifest.json'));print('$name', m.get('phase_seconds'), m.get('wall_seconds'), m['outputs']['data']['sha256'][:12], m['qc'].get('passed'))" | tee -a $R/timings.txt
  wc -l $R/$name/sft_data.jsonl | tee -a $R/timings.txt
done
git checkout scripts/utils/instruction_critic.py 2>/dev/null
