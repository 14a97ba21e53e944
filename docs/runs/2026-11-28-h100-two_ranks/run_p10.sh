#!/usr/bin/env bash
# Session 10: the whole gpu profile through the driver on one H100, fresh model cache, this tree (two scale ranks on the
# GPU by default for the bundled model; the relevance budget counts the process's own cache and is asked per batch).
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 STAGE1_CACHE_DIR=/tmp/stage1_cache STAGE1_SKIP_INSTALL=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0
mkdir -p /tmp/bin && rm -f /tmp/bin/python && printf '#!/bin/sh\nexec python3 "$@"\n' > /tmp/bin/python && chmod +x /tmp/bin/python
export PATH=/tmp/bin:$PATH
R=/tmp/p10; rm -rf $R; mkdir -p $R
rm -rf /tmp/stage1_cache/converted
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 > $R/gpu_samples.txt &
smi=$!
nvidia-smi --query-gpu=name --format=csv,noheader | tee $R/timings.txt
s=$(date +%s); bash scripts/run_stage1.sh --profile gpu --root $R > $R/driver.log 2>&1; rc=$?
echo "driver rc=$rc seconds=$(( $(date +%s) - s ))" | tee -a $R/timings.txt
kill $smi
grep -a "=== \|\[stage1\]" $R/driver.log | grep -v "it/s" | tee -a $R/timings.txt
python3 - >> $R/timings.txt <<'PY'
import json
m = json.load(open("/tmp/p10/data/stage1_sft_data.manifest.json"))
print("scale load", m["model_provenance"]["load_seconds"], "merge wall", m.get("wall_seconds"))
for s in m["shards"]:
    print("shard", s.get("index"), s["wall_seconds"], s["phase_seconds"], s.get("phase_counts", {}).get("sampling_misses"))
p = json.load(open("/tmp/p10/artifacts/pilot/session_manifest.json"))
print("pilot load", p["model_provenance"]["load_seconds"], p["wall_seconds"], p["phase_seconds"])
PY
echo ALLDONE >> $R/timings.txt
