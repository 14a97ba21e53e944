# Shared by the drivers (run_stage1.sh, run_stage2.sh); sourced, sets no shell options in the caller.
#
#   source scripts/driver_lib.sh
#   profile=$(resolve_profile "$profile")            # auto -> gpu or cpu, by torch.cuda
#   stage stage1 "pilot" python scripts/generate_stage1_pilot_data.py ...
#
# `stage TAG NAME COMMAND...` runs one pipeline stage, prints its exit code and wall time, and on a
# non-zero exit stops the driver with that code (3 refused, 4 gate failed, 2 bad input, 1 crash).

resolve_profile() {
  if [ "$1" = auto ]; then
    python -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')"
  else
    echo "$1"
  fi
}

stage() {
  local tag=$1 name=$2; shift 2
  local t0; t0=$(date +%s)
  echo; echo "[$tag] === $name: $*"
  "$@"; local rc=$?
  echo "[$tag] === $name finished with exit $rc in $(( $(date +%s) - t0 ))s"
  if [ $rc -ne 0 ]; then
    echo "[$tag] stopped at '$name' (exit $rc); its outputs and manifest say why" >&2
    exit $rc
  fi
}
