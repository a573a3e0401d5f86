#!/usr/bin/env bash
# Set up the environment (scripts/setup_env.sh) and run the whole test suite: ruff, then pytest.
# Usage: bash scripts/run_tests.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check .
# pytest-xdist: one worker per core, at most 4 (each holds torch in memory); PYTEST_WORKERS=0 runs serially.
# Test modules stay whole on one worker (--dist loadscope): module-scoped fixtures are built once.
cores=$(nproc 2>/dev/null || echo 1)
"$VENV/bin/python" -m pytest -q -n "${PYTEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}" --dist loadscope "$@"
