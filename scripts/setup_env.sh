#!/usr/bin/env bash
# Sourced by run_stage1.sh and run_tests.sh: make .venv with requirements.txt unless it is already
# there and current (a stamp holds the hash of the requirements it was built from).
# No `set -e` here: this file is sourced, and errexit would leak into the caller (the driver must
# report a failed stage itself rather than die silently).
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="${STAGE1_VENV:-$repo_root/.venv}"
python_bin="${PYTHON:-python3}"
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$repo_root/requirements.txt" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements into $venv (once)" >&2
  "$python_bin" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -r "$repo_root/requirements.txt" >&2
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export PYTHONUNBUFFERED=1
