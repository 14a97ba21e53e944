#!/usr/bin/env bash
# Stage 2 on top of a finished Stage 1 run: preference pairs -> DPO -> three-way evaluation.
#
#   bash scripts/run_stage2.sh                     # profile picked by the hardware (gpu or cpu), Stage 1 outputs under .
#   bash scripts/run_stage2.sh --profile gpu --root /tmp/stage1_run
#   bash scripts/run_stage1.sh --stage2            # the same, after Stage 1 passed all its gates
#
# Needs the Stage 1 layout under --root (results/sft_eval/evaluation_results.json with its gate passed,
# checkpoints/stage1_sft/final_adapter, data/test_instructions.jsonl). Stops at the first stage that fails
# its gate and exits with that stage's code (3 refused, 4 gate failed, 2 bad input, 1 crash); every stage
# resumes. Sizes: gpu = 1000 fresh instructions x 4 candidates, 1 DPO epoch at an effective batch of 8;
# cpu = 16 x 3. Environment overrides: S2_INSTRUCTIONS, S2_CANDIDATES, DPO_EPOCHS, BATCH; S2_ARGS adds
# flags to the pair stage (e.g. S2_ARGS="--corrupted-pairs"), DPO_ARGS to the DPO stage (e.g. "--beta 0.05").
# The base model is always the Stage 1 adapter's. STAGE1_SKIP_INSTALL=1 uses the python on PATH.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
profile=auto root=.
while [ $# -gt 0 ]; do
  case "$1" in
    --profile|--root)
      if [ $# -lt 2 ] || [ -z "$2" ]; then echo "$1 needs a value (see --help)" >&2; exit 2; fi
      case "$1" in
        --profile) profile=$2 ;;
        --root) root=$2 ;;
      esac
      shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "${STAGE1_SKIP_INSTALL:-0}" = 1 ]; then export PYTHONUNBUFFERED=1; else source scripts/setup_env.sh || exit 1; fi
read -r -a s2_args <<< "${S2_ARGS:-}"
source scripts/driver_lib.sh
profile=$(resolve_profile "$profile")
case "$profile" in
  # As in Stage 1, the effective batch of 8 is 8 x 1 on a GPU.
  gpu) : "${S2_INSTRUCTIONS:=1000}" "${S2_CANDIDATES:=4}" "${DPO_EPOCHS:=1}" "${BATCH:=256}" \
         "${DPO_ARGS=--per-device-batch-size 8 --grad-accum 1}" ;;
  cpu) : "${S2_INSTRUCTIONS:=16}" "${S2_CANDIDATES:=3}" "${DPO_EPOCHS:=1}" "${BATCH:=16}" "${DPO_ARGS=}" ;;
  *) echo "--profile must be gpu, cpu or auto" >&2; exit 2 ;;
esac
test_set=$root/data/test_instructions.jsonl
stage1_adapter=$root/checkpoints/stage1_sft/final_adapter
stage1_eval=$root/results/sft_eval/evaluation_results.json
pairs=$root/artifacts/stage2
dpo=$root/checkpoints/stage2_dpo
results=$root/results/stage2_eval
echo "[stage2] profile=$profile instructions=$S2_INSTRUCTIONS candidates=$S2_CANDIDATES dpo_epochs=$DPO_EPOCHS batch=$BATCH"
started=$(date +%s)

stage stage2 "pairs" python scripts/generate_stage2_preference_data.py --stage1-evaluation "$stage1_eval" --stage1-adapter "$stage1_adapter" \
  --output "$pairs" --num-instructions "$S2_INSTRUCTIONS" --num-candidates "$S2_CANDIDATES" --batch-size "$BATCH" "${s2_args[@]}"
if [ -f "$dpo/final_adapter/TRAINING_SUCCESS" ] && [ "$dpo/final_adapter/TRAINING_SUCCESS" -nt "$pairs/session_manifest.json" ]; then
  echo "[stage2] === dpo: $dpo/final_adapter/TRAINING_SUCCESS is newer than the pairs; skipped"
else
  read -r -a dpo_args <<< "${DPO_ARGS:-}"
  stage stage2 "dpo" python scripts/train_stage2_dpo.py --pairs "$pairs/preference_pairs.jsonl" --output "$dpo" --epochs "$DPO_EPOCHS" \
    --resume "${dpo_args[@]}"
fi
stage stage2 "evaluate" python scripts/evaluate_stage1_sft.py --sft-checkpoint "$dpo/final_adapter" --reference-checkpoint "$stage1_adapter" \
  --test-set "$test_set" --output "$results" --batch-size "$BATCH"

echo
echo "[stage2] all gates passed in $(( $(date +%s) - started ))s. Outputs:"
echo "  pairs         $pairs/preference_pairs.jsonl (+ session_manifest.json with the QC table)"
echo "  adapter       $dpo/final_adapter (TRAINING_SUCCESS, training_manifest.json, dpo_curves.png)"
echo "  evaluation    $results/evaluation_summary.txt (three-way), evaluation_results.json, success_rates.png"
