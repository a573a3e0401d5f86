#!/usr/bin/env bash
# Launcher for the authors' README command (PEDConv ResNet-18, 250 epochs):
# runs every recipe in configs/pedconv_authors/ on NGPUS GPUs via multiproc.py and writes logs/pedconv_authors/results.{md,csv}.
# Usage: DATA=/data/imagenet NGPUS=8 bash scripts/pedconv_authors.sh [--only REGEX] [extra main.py flags]
# See scripts/run_recipes.sh for the environment variables (DATA, NGPUS, LOGS, PYTHON, DRY_RUN).
set -euo pipefail
exec bash "$(dirname "$0")/run_recipes.sh" pedconv_authors "$@"
