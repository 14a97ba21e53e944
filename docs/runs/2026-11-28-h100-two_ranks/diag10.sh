#!/usr/bin/env bash
# Session 10 diagnosis on one H100: where the bundled model's load goes (fresh cache, then cached), and whether two
# scale processes on one GPU beat one (500 pairs in 2 shards each way).
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 STAGE1_CACHE_DIR=/tmp/stage1_cache STAGE1_SKIP_INSTALL=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0
R=/tmp/d10; mkdir -p $R; T=$R/timings.txt
{ nvidia-smi --query-gpu=name --format=csv,noheader; nproc; lscpu | grep "Model name"; python3 --version;
  python3 -c "import numpy, torch, transformers; print(numpy.__version__, torch.__version__, transformers.__version__)"; df -h /tmp | tail -1; } > $T 2>&1
rm -rf /tmp/stage1_cache/converted
python3 .device/prof_load10.py > $R/load_fresh.txt 2>&1; echo "fresh load rc=$?" >> $T
python3 .device/prof_load10.py > $R/load_cached.txt 2>&1; echo "cached load rc=$?" >> $T
timed() { local name=$1; shift; local s; s=$(date +%s.%N); "$@" > $R/$name.log 2>&1; local rc=$?
  echo "$name rc=$rc seconds=$(python3 -c "import time; print(round(time.time() - $s, 1))")" >> $T; return $rc; }
util() { nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 250 > $R/util_$1.txt & echo $!; }
timed testset python3 scripts/generate_test_instructions.py --count 200 --output $R/data/test.jsonl
timed pilot python3 scripts/generate_stage1_pilot_data.py --count 200 --output $R/pilot --batch-size 256 --num-candidates 4 --no-progress || exit 1
sa() { echo --pilot-manifest $R/pilot/session_manifest.json --count 500 --num-shards 2 --batch-size 256 --exclude-test-set $R/data/test.jsonl --no-progress --output $1; }
p=$(util one); timed scale_one_process python3 scripts/generate_stage1_scale_data.py $(sa $R/s1/data.jsonl); kill $p
p=$(util two); timed scale_two_ranks_one_gpu python3 -m torch.distributed.run --standalone --nproc-per-node 2 scripts/generate_stage1_scale_data.py $(sa $R/s2/data.jsonl); kill $p
for f in one two; do python3 -c "
import sys; v=[int(x) for x in open('$R/util_$f.txt') if x.strip().isdigit()]; print('$f util mean', round(sum(v)/max(1,len(v)),1), 'samples', len(v))" >> $T; done
python3 - >> $T <<'PY'
import json
for name in ("s1", "s2"):
    m = json.load(open(f"/tmp/d10/{name}/data.manifest.json"))
    print(name, "load", m["model_provenance"]["load_seconds"], [(s["wall_seconds"], s["phase_seconds"]) for s in m["shards"]])
m = json.load(open("/tmp/d10/pilot/session_manifest.json")); print("pilot load", m["model_provenance"]["load_seconds"], m["wall_seconds"], m["phase_seconds"])
PY
echo ALLDONE >> $T
