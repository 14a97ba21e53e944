#!/usr/bin/env bash
# Session 9: the whole gpu profile through the driver on one H100, on a fresh model cache (the pilot converts the GGUF
# as a first run does).
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 STAGE1_CACHE_DIR=/tmp/stage1_cache STAGE1_SKIP_INSTALL=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0
mkdir -p /tmp/bin && rm -f /tmp/bin/python && printf '#!/bin/sh\nexec python3 "$@"\n' > /tmp/bin/python && chmod +x /tmp/bin/python
export PATH=/tmp/bin:$PATH
R=/tmp/p9; mkdir -p $R
rm -rf /tmp/stage1_cache/converted
nvidia-smi --query-gpu=name --format=csv,noheader | tee $R/timings.txt
s=$(date +%s); bash scripts/run_stage1.sh --profile gpu --root $R > $R/driver.log 2>&1; rc=$?
echo "driver rc=$rc seconds=$(( $(date +%s) - s ))" | tee -a $R/timings.txt
grep -a "=== \|\[stage1\]" $R/driver.log | grep -v "it/s" | tee -a $R/timings.txt
echo ALLDONE >> $R/timings.txt
