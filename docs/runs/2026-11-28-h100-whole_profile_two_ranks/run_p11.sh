#!/usr/bin/env bash
# Session 11: the whole gpu profile through the driver on one H100, fresh model cache, this tree's defaults (two
# scale ranks on the GPU for the bundled model, each held to 47% of its memory). Then the evaluation stage again
# under cProfile, to see where its ~40 s go beyond the 4 s of generation.
set -uo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 STAGE1_CACHE_DIR=/tmp/stage1_cache STAGE1_SKIP_INSTALL=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0
mkdir -p /tmp/bin && rm -f /tmp/bin/python && printf '#!/bin/sh\nexec python3 "$@"\n' > /tmp/bin/python && chmod +x /tmp/bin/python
export PATH=/tmp/bin:$PATH
R=/tmp/p11; rm -rf $R; mkdir -p $R; T=$R/timings.txt
rm -rf /tmp/stage1_cache/converted
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 > $R/gpu_samples.txt &
smi=$!
nvidia-smi --query-gpu=name --format=csv,noheader | tee $T
s=$(date +%s); bash scripts/run_stage1.sh --profile gpu --root $R > $R/driver.log 2>&1; rc=$?
echo "driver rc=$rc seconds=$(( $(date +%s) - s ))" | tee -a $T
kill $smi
grep -a "=== \|\[stage1\]\|\[scale\]\|out of memory\|Error" $R/driver.log | grep -v "it/s" | tee -a $T
python3 - >> $T <<'PY'
import json
m = json.load(open("/tmp/p11/data/stage1_sft_data.manifest.json"))
print("scale load", m["model_provenance"]["load_seconds"], "merge wall", m.get("wall_seconds"))
for s in m["shards"]:
    print("shard", s.get("index"), s["wall_seconds"], s["phase_seconds"], s.get("phase_peak_gpu_gib"), s.get("phase_counts", {}).get("sampling_misses"))
p = json.load(open("/tmp/p11/artifacts/pilot/session_manifest.json"))
print("pilot load", p["model_provenance"]["load_seconds"], p["wall_seconds"], p["phase_seconds"], p.get("phase_peak_gpu_gib"))
t = json.load(open("/tmp/p11/checkpoints/stage1_sft/training_manifest.json"))
print("train", {k: t.get(k) for k in ("train_seconds", "tokens_per_second", "final_eval_loss")})
PY
echo PROFILEDONE >> $T
python3 -m cProfile -o $R/eval.prof scripts/evaluate_stage1_sft.py --sft-checkpoint $R/checkpoints/stage1_sft/final_adapter \
  --test-set $R/data/test_instructions.jsonl --output $R/results_prof --batch-size 256 --no-progress > $R/eval_prof.log 2>&1
echo "eval under cProfile rc=$?" >> $T
python3 -c "
import pstats; p = pstats.Stats('$R/eval.prof'); p.sort_stats('cumulative').print_stats(60)" > $R/eval_prof.txt 2>&1
echo ALLDONE >> $T
