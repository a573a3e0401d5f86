#!/usr/bin/env bash
# One-call GPU check of the fused Triton PEDConv kernels (README: "Fused Triton kernel").
#
#   bash scripts/gpu_check_triton_pedconv.sh OUT_DIR [args of image_classification.tools.triton_pedconv_check]
#
# Writes to OUT_DIR: nvidia-smi.txt, check.log, triton_pedconv_check.{json,md} (exactness of the kernels on
# the GPU, then every ResNet-18/50 PEDConv layer at batch 64, fp16 channels_last: Triton vs cuDNN forward and
# forward+backward, CUDA events), raport.json (DLLogger lines). With PYTEST=1 it first runs
# tests/dynamic/pedconv/test_triton_pedconv.py compiled on the GPU (adds several minutes of Triton compilation).
# Defaults fit one 10-minute device call (--budget-s 420 stops starting new layers; the JSON is rewritten
# after every layer, so a run cut short still reports what it measured).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:?usage: bash scripts/gpu_check_triton_pedconv.sh OUT_DIR [check args]}
shift
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
mkdir -p "$OUT_DIR"
nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1 || true
status=0
if [ "${PYTEST:-0}" = "1" ]; then
    "$PY" -m pytest -q -x tests/dynamic/pedconv/test_triton_pedconv.py 2>&1 | tee "$OUT_DIR/pytest.log" || status=1
fi
"$PY" -m image_classification.tools.triton_pedconv_check --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/check.log"
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && status=$rc
exit "$status"
