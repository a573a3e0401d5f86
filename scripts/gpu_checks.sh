#!/usr/bin/env bash
# Every GPU check of the project in one call (~9-10 minutes on one H100/H200; docs/gpu.md).
#
#   bash scripts/gpu_checks.sh OUT_DIR
#
# Stages (each under its own time limit; a failed or timed-out stage is recorded and the next one runs):
#   1. pytest -m cuda       the cuda-marked tests (Triton path, benchmark/profiler on CUDA, main.py end to end:
#                           AMP fp16/bf16, nhwc, --compile, EMA, resume, NCCL DDP, dali-gpu)  -> pytest.log
#      pytest (Triton)      tests/dynamic/test_triton_{pedconv,path}.py compiled on the GPU    -> pytest_triton.log
#   2. triton check         exactness of the fused kernel on the GPU, then the ResNet-18/50 PEDConv layers at
#                           batch 64 fp16 channels_last vs cuDNN                              -> triton/
#   3. per-layer benchmark  R18/R50 shapes, batch 64, fp16, channels_last, every operator and every PEDConv path,
#                           forward and train step (fwd+bwd) as ratios to nn.Conv2d           -> benchmark.json/.txt
#   4. whole networks       profiler --latency --device cuda --amp fp16 --channels-last for R18/R50/MBv2:
#                           train throughput, train step, batch-1 inference, peak memory vs static -> profiler_*.json
#   5. input pipeline       loader_benchmark on 1024 generated 500x375 JPEGs: every installed backend at -j 4 and
#                           12 vs the bare decode loop, and a ResNet-18 AMP channels-last training step fed by each
#                           backend vs synthetic data on the GPU (is the headline run data-bound?) -> loader.{json,log}
#   6. summary              python -m image_classification.tools.gpu_report OUT_DIR             -> summary.{md,json}
#
# Environment: PYTHON (interpreter; default .venv/bin/python, else python3), NETS (profiler architectures,
# default "resnet18 resnet50 mobilenet_v2_x1.0"), CONVS (profiler operators, default "pedconv"), BATCH (64),
# per-stage limits in seconds: T_PYTEST (150), T_PYTEST_TRITON (90), T_TRITON (80), T_BENCH (90), T_NET (35 per
# network), T_LOADER (120; 0 skips the input-pipeline stage), and
# PEDCONV_TRITON_TILES (default here: small = 3 candidate tiles per kernel, a third of the Triton compilations
# of a new layer shape; full = every tile; heuristic = no Triton autotuning). Defaults total ~9-10 minutes; a
# stage cut short keeps what it wrote (the benchmark rewrites its JSON after every layer shape).
# DALI_WHEELS=DIR: on a machine without a package registry, install nvidia-dali-cuda120 from the wheels in DIR
# (pip --no-index) when DALI is not importable, so that the dali-gpu test runs instead of being skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:?usage: bash scripts/gpu_checks.sh OUT_DIR}
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
NETS=${NETS:-resnet18 resnet50 mobilenet_v2_x1.0}
CONVS=${CONVS:-pedconv}
BATCH=${BATCH:-64}
export PEDCONV_TRITON_TILES=${PEDCONV_TRITON_TILES:-small}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
: >"$OUT_DIR/stages.tsv"
status=0

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_checks.sh: error: CUDA is not available to $PY (these checks need a GPU)" >&2
    exit 2
fi
nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1 || true
if [ -n "${DALI_WHEELS:-}" ] && ! "$PY" -c "import nvidia.dali" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --find-links "$DALI_WHEELS" nvidia-dali-cuda120 >"$OUT_DIR/dali_install.log" 2>&1 \
        || echo "gpu_checks.sh: note: installing DALI from $DALI_WHEELS failed (see dali_install.log)" >&2
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))
try:
    import triton; print('triton', triton.__version__)
except Exception as exc: print('triton missing:', exc)
from image_classification.dynamic.pedconv.triton import unavailable_reason
print('pedconv path=triton:', unavailable_reason('cuda') or 'offered (compiled kernels on this GPU)')
try:
    import nvidia.dali as d; print('dali', d.__version__)
except Exception as exc: print('dali missing:', exc)" >"$OUT_DIR/versions.txt" 2>&1
cat "$OUT_DIR/versions.txt"

# stage NAME LIMIT_S LOG COMMAND...: run with a time limit, output to LOG (and the terminal), record exit/seconds
stage() {
    local name=$1 limit=$2 log=$3
    shift 3
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$OUT_DIR/stages.tsv"
    [ "$rc" -ne 0 ] && status=1
    return 0
}

stage pytest-cuda "${T_PYTEST:-150}" "$OUT_DIR/pytest.log" \
    "$PY" -m pytest -q -m cuda -p no:cacheprovider --junitxml "$OUT_DIR/pytest.xml" tests
stage pytest-triton "${T_PYTEST_TRITON:-90}" "$OUT_DIR/pytest_triton.log" \
    "$PY" -m pytest -q -p no:cacheprovider --junitxml "$OUT_DIR/pytest_triton.xml" \
    tests/dynamic/pedconv/test_triton_pedconv.py tests/dynamic/pedconv/test_triton_path.py
stage triton-check "${T_TRITON:-80}" "$OUT_DIR/triton_check.log" \
    "$PY" -m image_classification.tools.triton_pedconv_check --out "$OUT_DIR/triton" --batch "$BATCH" \
    --dtype fp16 --memory-format nhwc --budget-s "$(( ${T_TRITON:-80} - 20 ))"
SHAPES=r18-3x3-64@56,r18-3x3-128@28,r18-3x3-256@14,r18-3x3-512@7,r18-3x3s2-64-128@56,r50-1x1-64-256@56,r50-1x1-256-64@56,r50-1x1-2048-512@7
stage benchmark "${T_BENCH:-90}" "$OUT_DIR/benchmark.log" \
    "$PY" -m image_classification.tools.benchmark --device cuda --amp fp16 --channels-last --batch-sizes "$BATCH" \
    --shapes "$SHAPES" --ops pedconv,dcd,dyconv,condconv,odconv --all-paths --repeats 3 --json \
    --out-json "$OUT_DIR/benchmark.json"
for net in $NETS; do
    for conv in $CONVS; do
        tag=$(echo "${net}_${conv}" | tr ':=,' '___')
        stage "profiler-$tag" "${T_NET:-35}" "$OUT_DIR/profiler_$tag.log" \
            "$PY" -m image_classification.tools.profiler --arch "$net" --conv "$conv" --latency --device cuda --amp fp16 \
            --channels-last --train-batch "$BATCH" --train-steps 10 --images 50 --warmup 10 --json \
            --out-json "$OUT_DIR/profiler_$tag.json"
    done
done
if [ "${T_LOADER:-120}" -gt 0 ]; then
    JPEG_DIR=$(mktemp -d)  # the sample JPEGs stay off OUT_DIR (what comes back from a lent machine is limited)
    stage input-pipeline "${T_LOADER:-120}" "$OUT_DIR/loader.log" \
        "$PY" -m image_classification.tools.loader_benchmark "$JPEG_DIR/data" --write-sample-images 1024 \
        --images 1024 -b "$BATCH" -j 4 12 --model-img-s 3000 --feed resnet18 --feed-seconds 6 --device cuda \
        --json "$OUT_DIR/loader.json"
    rm -rf "$JPEG_DIR"
fi
"$PY" -m image_classification.tools.gpu_report "$OUT_DIR" || status=1
echo "gpu_checks.sh: summary in $OUT_DIR/summary.md (exit $status)"
exit "$status"
