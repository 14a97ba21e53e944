#!/usr/bin/env bash
# The test command: installs what it needs into .venv, runs the DRY check, the registry check and
# ruff, then the test suite. Arguments go to pytest:
#   bash scripts/run_tests.sh                  # everything (what CI runs)
#   bash scripts/run_tests.sh -m "not slow"    # the quick loop: no real bundled-model runs, no test over ~20 s
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
python scripts/check_dry.py
python scripts/check_registry.py
ruff check --output-format concise
python -m pytest -q -p no:cacheprovider "$@" tests
