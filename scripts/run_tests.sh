#!/usr/bin/env bash
# Set up the environment (scripts/setup_env.sh) and run the whole test suite: ruff, then pytest.
# Usage: bash scripts/run_tests.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest -q "$@"
