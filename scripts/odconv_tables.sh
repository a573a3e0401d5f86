#!/usr/bin/env bash
# Launcher for ODConv (Li et al., ICLR 2022) Tables 1 and 2: static, ODConv 1x and 4x on MobileNetV2 x1.0/x0.5
# and ResNet-18/50 with the authors' recipes; runs every recipe in configs/odconv_tables/ on NGPUS GPUs via
# multiproc.py and writes logs/odconv_tables/results.{md,csv}.
# Usage: DATA=/data/imagenet NGPUS=8 bash scripts/odconv_tables.sh [--only REGEX] [extra main.py flags]
# See scripts/run_recipes.sh for the environment variables (DATA, NGPUS, LOGS, PYTHON, DRY_RUN).
set -euo pipefail
exec bash "$(dirname "$0")/run_recipes.sh" odconv_tables "$@"
