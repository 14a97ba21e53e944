#!/usr/bin/env bash
# Session 7, third lease: the whole gpu profile through the driver on one H100 with the new defaults (bundled model:
# 16-bit base, length groups, no cuDNN attention, CUDA-graph training steps), stage by stage.
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 STAGE1_CACHE_DIR=/tmp/stage1_cache STAGE1_SKIP_INSTALL=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0
mkdir -p /tmp/bin && rm -f /tmp/bin/python && printf '#!/bin/sh\nexec python3 "$@"\n' > /tmp/bin/python && chmod +x /tmp/bin/python
export PATH=/tmp/bin:$PATH
R=/tmp/d1; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | tee $R/timings.txt
s=$(date +%s); bash scripts/run_stage1.sh --profile gpu --root $R > $R/driver.log 2>&1; rc=$?
echo "driver rc=$rc seconds=$(( $(date +%s) - s ))" | tee -a $R/timings.txt
grep -a "=== \|\[stage1\]" $R/driver.log | grep -v "it/s" | tee -a $R/timings.txt
