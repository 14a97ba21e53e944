#!/usr/bin/env bash
# The whole Stage 1 pipeline: held-out test set -> pilot -> scale -> QLoRA SFT -> paired evaluation.
#
#   bash scripts/run_stage1.sh                      # profile picked by the hardware (gpu or cpu)
#   bash scripts/run_stage1.sh --profile gpu --model /models/Qwen2.5-7B
#
# Stops at the first stage that fails its gate and exits with that stage's code (3 refused,
# 4 gate failed, 2 bad input, 1 crash). Every stage resumes, so rerunning continues where a
# killed run stopped. Sizes: gpu = the source's (pilot 200, scale 2000, 3 epochs, 200 test
# instructions); cpu = small counts (13 min 10 s measured on 2 cores, docs/measurements.md).
# Any size can be overridden by environment variable (PILOT_COUNT=..., SCALE_COUNT=..., ...);
# TRAIN_ARGS adds flags to the training stage, GEN_ARGS to the pilot (the scale stage inherits
# them through the pilot manifest; gpu default "--num-candidates 4"), e.g. GEN_ARGS="--calibration source".
# The model's calibration is the pilot's own (--calibration auto, scripts/utils/calibration.py): the
# bundled gemma-3-270m, recognised by its file sha256, gets the settings measured for it; any other
# model the source's. The pilot manifest records which, why, and each value.
# --stage2 continues, once every Stage 1 gate passed, with scripts/run_stage2.sh (preference pairs from
# the Stage 1 adapter's own candidates, DPO, three-way evaluation) on the same profile and root.
# Several GPUs: the scale stage runs one torchrun rank per visible GPU (at most one per shard; measured
# 1.93x on 2 and 3.25x on 4, docs/scaling.md), training stays on one GPU (data parallelism was slower
# for the bundled model). The bundled model runs two scale ranks per GPU of 40 GiB or more, each held to 47% of its
# memory: one process left an H100 idle two thirds of the time, two took the stage from 354 to 206-214 s
# (docs/measurements.md, "The whole gpu profile in 7.5 minutes").
# SCALE_RANKS=N overrides the number of scale processes (1: no torchrun; more than the GPUs share them).
# Learning rate: the bundled gemma-3-270m (no --model) trains at 5e-4 on the gpu profile, measured better
# than the source's 2e-4 in two paired runs (docs/measurements.md, "Constraint variants"); any other model,
# and the cpu profile, keep the source's 2e-4. LR=... sets it for any model.
# Training: the bundled model trains LoRA on its 16-bit base on the gpu profile (QUANT=none; its weights are 0.5 GB, and
# against 4-bit QLoRA on the same data it trained faster to a lower eval loss, docs/measurements.md, "Training speed");
# any other model, and the cpu profile, keep --quantization auto (4-bit QLoRA on CUDA, as the source asks). QUANT=4bit,
# none or auto sets it for any model. The gpu TRAIN_ARGS also group batches by length and keep attention off cuDNN
# (--no-cudnn-attention): the same examples per step, less padding and no per-shape cuDNN plans; they evaluate every
# 200 steps (--eval-steps 200: ten points on the gpu profile's eval-loss curve; each evaluation took ~2 s of a 116 s
# run at the default of every 100). The bundled model on
# the gpu profile also replays each training step from a CUDA graph (GRAPHS=1, --cuda-graphs: its step is bound by
# kernel launches, not the GPU); GRAPHS=0 turns that off, GRAPHS=1 asks for it with any model (one GPU, no gradient
# checkpointing, else the training stage exits 2).
# STAGE1_SKIP_INSTALL=1 uses the python on PATH.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
profile=auto model_args=() root=. stage2=0
while [ $# -gt 0 ]; do
  case "$1" in
    --stage2) stage2=1; shift ;;
    --profile|--model|--root)
      if [ $# -lt 2 ] || [ -z "$2" ]; then echo "$1 needs a value (see --help)" >&2; exit 2; fi
      case "$1" in
        --profile) profile=$2 ;;
        --model) model_args=(--model "$2") ;;
        --root) root=$2 ;;
      esac
      shift 2 ;;
    -h|--help) sed -n '2,38p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "${STAGE1_SKIP_INSTALL:-0}" = 1 ]; then export PYTHONUNBUFFERED=1; else source scripts/setup_env.sh || exit 1; fi
source scripts/driver_lib.sh
profile=$(resolve_profile "$profile")
case "$profile" in
  # On a GPU the effective batch stays the source's 8 (8 x 1 instead of 1 x 8): 8.6x faster on gemma-3-270m.
  # Best of 4 response candidates on a GPU (every measured GPU run in docs/measurements.md since response_v4); 1 on a CPU.
  gpu) : "${TEST_COUNT:=200}" "${PILOT_COUNT:=200}" "${SCALE_COUNT:=2000}" "${SHARDS:=4}" "${EPOCHS:=3}" "${BATCH:=256}" \
         "${TRAIN_ARGS=--per-device-batch-size 8 --grad-accum 1 --group-by-length --no-cudnn-attention --eval-steps 200}" "${GEN_ARGS=--num-candidates 4}" ;;
  cpu) : "${TEST_COUNT:=25}" "${PILOT_COUNT:=16}" "${SCALE_COUNT:=16}" "${SHARDS:=2}" "${EPOCHS:=1}" "${BATCH:=16}" "${TRAIN_ARGS=}" \
         "${GEN_ARGS=}" ;;
  *) echo "--profile must be gpu, cpu or auto" >&2; exit 2 ;;
esac
read -r -a gen_args <<< "${GEN_ARGS:-}"
bundled_on_gpu=0  # the bundled model's measured gpu settings (lr, 16-bit base; see the header)
[ "$profile" = gpu ] && [ ${#model_args[@]} -eq 0 ] && bundled_on_gpu=1
if [ -z "${LR:-}" ]; then
  LR=2e-4
  [ $bundled_on_gpu = 1 ] && LR=5e-4
fi
if [ -z "${QUANT:-}" ]; then
  QUANT=auto
  [ $bundled_on_gpu = 1 ] && QUANT=none
fi
case "$QUANT" in
  auto|4bit|none) ;;
  *) echo "QUANT must be auto, 4bit or none, got '$QUANT'" >&2; exit 2 ;;
esac
: "${GRAPHS:=$bundled_on_gpu}"
case "$GRAPHS" in
  0) graph_args=() ;;
  1) graph_args=(--cuda-graphs) ;;
  *) echo "GRAPHS must be 0 or 1, got '$GRAPHS'" >&2; exit 2 ;;
esac
if [ -z "${SCALE_RANKS:-}" ]; then
  SCALE_RANKS=1
  # Two bundled-model ranks per GPU where each GPU has room for two: at 47% of an H100 each, a shard's phases reserved
  # at most 31.5 GiB, its responses 15.8 GiB (docs/measurements.md).
  [ "$profile" = gpu ] && SCALE_RANKS=$(python -c "
import torch
gpus = torch.cuda.device_count()
roomy = gpus and min(torch.cuda.get_device_properties(i).total_memory for i in range(gpus)) >= 40 * 2**30
print(max(1, min((2 if $bundled_on_gpu and roomy else 1) * gpus, $SHARDS)))")
fi
case "$SCALE_RANKS" in
  ''|*[!0-9]*|0) echo "SCALE_RANKS must be a whole number >= 1, got '$SCALE_RANKS'" >&2; exit 2 ;;
esac
scale_launcher=(python)
[ "$SCALE_RANKS" -gt 1 ] && scale_launcher=(python -m torch.distributed.run --standalone --nproc-per-node "$SCALE_RANKS")
test_set=$root/data/test_instructions.jsonl
pilot=$root/artifacts/pilot
dataset=$root/data/stage1_sft_data.jsonl
checkpoint=$root/checkpoints/stage1_sft
results=$root/results/sft_eval
echo "[stage1] profile=$profile test=$TEST_COUNT pilot=$PILOT_COUNT scale=$SCALE_COUNT shards=$SHARDS scale_ranks=$SCALE_RANKS epochs=$EPOCHS batch=$BATCH lr=$LR quantization=$QUANT cuda_graphs=$GRAPHS"
started=$(date +%s)

stage stage1 "test set" python scripts/generate_test_instructions.py --count "$TEST_COUNT" --output "$test_set"
stage stage1 "pilot" python scripts/generate_stage1_pilot_data.py --count "$PILOT_COUNT" --output "$pilot" --batch-size "$BATCH" \
  "${model_args[@]}" "${gen_args[@]}"
stage stage1 "scale" "${scale_launcher[@]}" scripts/generate_stage1_scale_data.py --pilot-manifest "$pilot/session_manifest.json" \
  --count "$SCALE_COUNT" --num-shards "$SHARDS" --output "$dataset" --batch-size "$BATCH" --exclude-test-set "$test_set"
if [ -f "$checkpoint/final_adapter/TRAINING_SUCCESS" ] && [ "$checkpoint/final_adapter/TRAINING_SUCCESS" -nt "${dataset%.jsonl}.manifest.json" ]; then
  echo "[stage1] === train: $checkpoint/final_adapter/TRAINING_SUCCESS is newer than the dataset; skipped"
else
  read -r -a train_args <<< "${TRAIN_ARGS:-}"
  stage stage1 "train" python scripts/train_stage1_sft.py --data "$dataset" --output "$checkpoint" --epochs "$EPOCHS" --lr "$LR" --quantization "$QUANT" --resume \
    "${model_args[@]}" "${graph_args[@]}" "${train_args[@]}"
fi
stage stage1 "evaluate" python scripts/evaluate_stage1_sft.py --sft-checkpoint "$checkpoint/final_adapter" --test-set "$test_set" \
  --output "$results" --batch-size "$BATCH"

echo
echo "[stage1] all gates passed in $(( $(date +%s) - started ))s. Outputs:"
echo "  test set      $test_set"
echo "  pilot         $pilot/session_manifest.json"
echo "  dataset       $dataset (+ ${dataset%.jsonl}.manifest.json)"
echo "  adapter       $checkpoint/final_adapter (TRAINING_SUCCESS, training_manifest.json, loss_curve.png)"
echo "  evaluation    $results/evaluation_summary.txt, evaluation_results.json, success_rates.png"
if [ "$stage2" = 1 ]; then
  echo
  STAGE1_SKIP_INSTALL=1 bash scripts/run_stage2.sh --profile "$profile" --root "$root"
  exit $?
fi
