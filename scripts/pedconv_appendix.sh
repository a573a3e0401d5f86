#!/usr/bin/env bash
# Launcher for PEDConv appendix Tables 2-3 (generator design, additive reparameterization) and Fig. 3 (MobileNetV1 widths):
# runs every recipe in configs/pedconv_appendix/ on NGPUS GPUs via multiproc.py and writes logs/pedconv_appendix/results.{md,csv}.
# Usage: DATA=/data/imagenet NGPUS=8 bash scripts/pedconv_appendix.sh [--only REGEX] [extra main.py flags]
# See scripts/run_recipes.sh for the environment variables (DATA, NGPUS, LOGS, PYTHON, DRY_RUN).
set -euo pipefail
exec bash "$(dirname "$0")/run_recipes.sh" pedconv_appendix "$@"
