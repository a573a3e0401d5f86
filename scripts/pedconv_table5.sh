#!/usr/bin/env bash
# Launcher for PEDConv Table 5a-d and Sec. 4.5 info-max ablation:
# runs every recipe in configs/pedconv_table5/ on NGPUS GPUs via multiproc.py and writes logs/pedconv_table5/results.{md,csv}.
# Usage: DATA=/data/imagenet NGPUS=8 bash scripts/pedconv_table5.sh [--only REGEX] [extra main.py flags]
# See scripts/run_recipes.sh for the environment variables (DATA, NGPUS, LOGS, PYTHON, DRY_RUN).
set -euo pipefail
exec bash "$(dirname "$0")/run_recipes.sh" pedconv_table5 "$@"
