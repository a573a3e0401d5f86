#!/usr/bin/env bash
# Launcher for PEDConv Table 4 (adversarial robustness of ResNet-50 and PEDConv-ResNet-50 after free adversarial
# training, m = 4, l_inf eps 4/255): trains every recipe in configs/pedconv_table4/ on NGPUS GPUs (scripts/run_recipes.sh),
# then evaluates each trained model (its final checkpoint) on natural images and under PGD-10 and PGD-50 (eps 4/255,
# step 1/255, random start) into logs/pedconv_table4/<recipe>/raport_pgd.json, and writes
# logs/pedconv_table4/robustness.{md,csv} (natural top-1 = "best top-1", robust top-1 per attack).
# Usage: DATA=/data/imagenet NGPUS=8 bash scripts/pedconv_table4.sh [--only REGEX] [extra main.py flags]
#   extra flags go to the training and the evaluation runs (e.g. --amp, -b 32 on more than 8 GPUs)
# See scripts/run_recipes.sh for the environment variables (DATA, NGPUS, LOGS, PYTHON, DRY_RUN).
# An evaluation whose raport is complete is skipped; PGD-50 on the 50k validation images costs about 100
# validation passes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/run_recipes.sh pedconv_table4 "$@"

ONLY=""
if [ "${1:-}" = "--only" ]; then ONLY=$2; shift 2; fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "${NGPUS:-}" ]; then
  NGPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [ "$NGPUS" -ge 1 ] 2>/dev/null || NGPUS=1
fi
LOGS=${LOGS:-logs}
DRY_RUN=${DRY_RUN:-0}
run() {
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

raports=()
for config in configs/pedconv_table4/[!_]*.yaml; do  # _base.yaml is inherited, not run
  name=$(basename "$config" .yaml)
  if [ -n "$ONLY" ] && ! grep -qE -- "$ONLY" <<<"$name"; then continue; fi
  workspace=$LOGS/pedconv_table4/$name
  raport=$workspace/raport_pgd.json
  raports+=("$raport")
  if [ "$DRY_RUN" != 1 ] && [ -f "$raport" ] && "$PYTHON" scripts/collect_results.py --complete "$raport" >/dev/null 2>&1; then
    echo "[pedconv_table4] $name: PGD evaluation done ($raport), skipped"
    continue
  fi
  if [ "$DRY_RUN" != 1 ] && [ ! -f "$workspace/checkpoint.pth.tar" ]; then
    echo "[pedconv_table4] $name: no trained checkpoint in $workspace, not evaluated" >&2
    continue
  fi
  echo "[pedconv_table4] $name: natural, PGD-10 and PGD-50 top-1 -> $raport"
  run "$PYTHON" multiproc.py --nproc_per_node "$NGPUS" main.py "${DATA:-/data/imagenet}" \
    --config "$config" --evaluate --pretrained-weights "$workspace/checkpoint.pth.tar" \
    --attack pgd --attack-steps 10 50 --attack-eps 4 --attack-step-size 1 \
    --workspace "$workspace" --raport-file raport_pgd.json "$@"
done
if [ "$DRY_RUN" != 1 ]; then
  existing=()
  for raport in "${raports[@]}"; do [ -f "$raport" ] && existing+=("$raport"); done
  if [ ${#existing[@]} -gt 0 ]; then
    "$PYTHON" scripts/collect_results.py "${existing[@]}" --markdown "$LOGS/pedconv_table4/robustness.md" \
      --csv "$LOGS/pedconv_table4/robustness.csv"
  fi
fi
