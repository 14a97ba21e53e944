#!/usr/bin/env bash
# The test command: installs what it needs into .venv, runs the DRY check, then the test suite.
#   bash scripts/run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
python scripts/check_dry.py
python -m pytest -q -p no:cacheprovider "$@" tests
