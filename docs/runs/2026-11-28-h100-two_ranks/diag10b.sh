#!/usr/bin/env bash
# Session 10, last lease: one scale process, 1,000 pairs in 2 shards, with per-phase peak GPU memory in the manifests.
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 STAGE1_CACHE_DIR=/tmp/stage1_cache STAGE1_SKIP_INSTALL=1 TOKENIZERS_PARALLELISM=false
R=/tmp/d10b; rm -rf $R; mkdir -p $R; T=$R/timings.txt
timed() { local name=$1; shift; local s; s=$(date +%s.%N); "$@" > $R/$name.log 2>&1; local rc=$?
  echo "$name rc=$rc seconds=$(python3 -c "import time; print(round(time.time() - $s, 1))")" >> $T; return $rc; }
timed testset python3 scripts/generate_test_instructions.py --count 200 --output $R/data/test.jsonl
timed pilot python3 scripts/generate_stage1_pilot_data.py --count 200 --output $R/pilot --batch-size 256 --num-candidates 4 --no-progress || exit 1
timed scale_one_process python3 scripts/generate_stage1_scale_data.py --pilot-manifest $R/pilot/session_manifest.json --count 1000 \
  --num-shards 2 --batch-size 256 --exclude-test-set $R/data/test.jsonl --no-progress --output $R/s1/data.jsonl
python3 - >> $T <<'PY'
import json
p = json.load(open("/tmp/d10b/pilot/session_manifest.json"))
print("pilot load", p["model_provenance"]["load_seconds"], p["wall_seconds"], p["phase_seconds"], p.get("phase_peak_gpu_gib"))
m = json.load(open("/tmp/d10b/s1/data.manifest.json"))
print("scale load", m["model_provenance"]["load_seconds"])
for s in m["shards"]:
    print("shard", s["wall_seconds"], s["phase_seconds"], s.get("phase_peak_gpu_gib"))
PY
echo ALLDONE >> $T
