#!/usr/bin/env bash
# Launcher for PEDConv Table 1 (ImageNet: ResNet-18/50, MobileNetV1/V2, EfficientNet-B0; static, PEDConv and peers):
# runs every recipe in configs/pedconv_table1/ on NGPUS GPUs via multiproc.py and writes logs/pedconv_table1/results.{md,csv}.
# Usage: DATA=/data/imagenet NGPUS=8 bash scripts/pedconv_table1.sh [--only REGEX] [extra main.py flags]
# See scripts/run_recipes.sh for the environment variables (DATA, NGPUS, LOGS, PYTHON, DRY_RUN).
set -euo pipefail
exec bash "$(dirname "$0")/run_recipes.sh" pedconv_table1 "$@"
