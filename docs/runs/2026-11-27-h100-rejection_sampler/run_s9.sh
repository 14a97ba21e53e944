#!/usr/bin/env bash
# Session 9: the 7B response shape with the compiled rejection sampler (benchmark), then its kernel table.
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 STAGE1_CACHE_DIR=/tmp/stage1_cache TOKENIZERS_PARALLELISM=false
R=/tmp/s9; mkdir -p $R; export OUT_DIR=$R
nvidia-smi --query-gpu=name --format=csv,noheader | tee $R/timings.txt
s=$(date +%s); python3 scripts/benchmark_generation.py --models qwen7b --measurements response --output $R/response_7b.json > $R/bench.log 2>&1
echo "bench rc=$? seconds=$(( $(date +%s) - s ))" | tee -a $R/timings.txt
grep -a "response_\|shared prefix" $R/bench.log >> $R/timings.txt
s=$(date +%s); python3 .device/prof_s9.py > $R/prof.log 2>&1
echo "prof rc=$? seconds=$(( $(date +%s) - s ))" | tee -a $R/timings.txt
echo ALLDONE >> $R/timings.txt
