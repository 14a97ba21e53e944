#!/usr/bin/env bash
# Session 9: the pilot stage with cd6b6aa's scripts and with this tree's, on the same warm machine (converted model cached).
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 STAGE1_CACHE_DIR=/tmp/stage1_cache TOKENIZERS_PARALLELISM=false
R=/tmp/ab9; mkdir -p $R
for variant in old new old new; do
  dir=scripts; [ $variant = old ] && dir=.device/old/scripts
  rm -rf $R/pilot_$variant
  s=$(date +%s.%N)
  python3 $dir/generate_stage1_pilot_data.py --count 200 --output $R/pilot_$variant --batch-size 256 --num-candidates 4 > $R/log_$variant.txt 2>&1
  echo "$variant rc=$? seconds=$(echo "$(date +%s.%N) - $s" | bc)" | tee -a $R/ab.txt
  python3 -c "import json,sys; m=json.load(open('$R/pilot_$variant/session_manifest.json')); print(' ', json.dumps(m.get('phase_seconds')))" | tee -a $R/ab.txt
done
echo ALLDONE >> $R/ab.txt
