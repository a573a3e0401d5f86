#!/usr/bin/env bash
# Run every recipe (configs/<table>/*.yaml but _base.yaml) of one paper table, one after the other, each on NGPUS GPUs
# through multiproc.py, then collect the raports into logs/<table>/results.{md,csv}.
#
# Usage: bash scripts/run_recipes.sh <table> [--only REGEX] [extra main.py flags...]
#   <table>        a directory under configs/ (e.g. pedconv_table1, dcd_table4)
#   --only REGEX   run only the recipes whose file name (without .yaml) matches REGEX (grep -E)
#   extra flags    passed to main.py after --config, so they override the recipe (e.g. -b 32, --amp)
# Environment:
#   DATA=/data/imagenet   dataset root with train/ and val/ (required unless DRY_RUN=1)
#   NGPUS=8               processes per node (default: the number of GPUs nvidia-smi lists, else 1)
#   LOGS=logs             where each recipe's workspace logs/<table>/<recipe>/ goes
#   PYTHON=python         the interpreter (default: .venv/bin/python when present, else python3)
#   DRY_RUN=1             print the commands instead of running them
# A recipe whose workspace holds a finished raport is skipped; one with a checkpoint is resumed
# (--resume auto).
# The recipes' -b (per-GPU batch) assumes 8 GPUs; --optimizer-batch-size keeps the paper's global
# batch on fewer GPUs by gradient accumulation. On more than 8 GPUs pass -b <global batch / GPUs>.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
  exit $(( $# < 1 ? 2 : 0 ))
fi
TABLE=$1; shift
ONLY=""
if [ "${1:-}" = "--only" ]; then
  [ $# -ge 2 ] || { echo "error: --only needs a regular expression" >&2; exit 2; }
  ONLY=$2; shift 2
fi
CONFIG_DIR=configs/$TABLE
[ -d "$CONFIG_DIR" ] || { echo "error: no recipe directory $CONFIG_DIR (tables: $(ls configs | tr '\n' ' '))" >&2; exit 2; }

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "${NGPUS:-}" ]; then
  NGPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [ "$NGPUS" -ge 1 ] 2>/dev/null || NGPUS=1
fi
LOGS=${LOGS:-logs}
DRY_RUN=${DRY_RUN:-0}
if [ "$DRY_RUN" != 1 ]; then
  [ -n "${DATA:-}" ] || { echo "error: set DATA to the dataset root (with train/ and val/), e.g. DATA=/data/imagenet" >&2; exit 2; }
  [ -d "$DATA" ] || { echo "error: DATA=$DATA is not a directory" >&2; exit 2; }
fi

run() {
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

shopt -s nullglob
configs=("$CONFIG_DIR"/[!_]*.yaml)  # _base.yaml: what the recipes inherit, not a run
[ ${#configs[@]} -gt 0 ] || { echo "error: no *.yaml recipes in $CONFIG_DIR" >&2; exit 2; }
ran=0
for config in "${configs[@]}"; do
  name=$(basename "$config" .yaml)
  if [ -n "$ONLY" ] && ! grep -qE -- "$ONLY" <<<"$name"; then continue; fi
  workspace=$LOGS/$TABLE/$name
  raport=$workspace/raport.json
  if [ "$DRY_RUN" != 1 ] && [ -f "$raport" ] && "$PYTHON" scripts/collect_results.py --complete "$raport" >/dev/null 2>&1; then
    echo "[$TABLE] $name: finished run in $workspace, skipped"
    continue
  fi
  echo "[$TABLE] $name on $NGPUS GPU(s) -> $workspace"
  [ "$DRY_RUN" = 1 ] || mkdir -p "$workspace"
  run "$PYTHON" multiproc.py --nproc_per_node "$NGPUS" main.py "${DATA:-/data/imagenet}" \
    --config "$config" --workspace "$workspace" --raport-file raport.json --resume auto "$@"
  ran=$((ran + 1))
done
[ "$ran" -gt 0 ] || [ -z "$ONLY" ] || echo "[$TABLE] note: no recipe matched --only $ONLY"
if [ "$DRY_RUN" != 1 ] && [ -d "$LOGS/$TABLE" ]; then
  "$PYTHON" scripts/collect_results.py "$LOGS/$TABLE" --markdown "$LOGS/$TABLE/results.md" --csv "$LOGS/$TABLE/results.csv" || true
fi
