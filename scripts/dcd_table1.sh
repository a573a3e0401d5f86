#!/usr/bin/env bash
# Launcher for DCD Table 1 (formulations of DCD):
# runs every recipe in configs/dcd_table1/ on NGPUS GPUs via multiproc.py and writes logs/dcd_table1/results.{md,csv}.
# Usage: DATA=/data/imagenet NGPUS=8 bash scripts/dcd_table1.sh [--only REGEX] [extra main.py flags]
# See scripts/run_recipes.sh for the environment variables (DATA, NGPUS, LOGS, PYTHON, DRY_RUN).
set -euo pipefail
exec bash "$(dirname "$0")/run_recipes.sh" dcd_table1 "$@"
