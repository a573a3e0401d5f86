#!/usr/bin/env bash
# The main job in one command, from a fresh clone on a CPU-only machine:
#   1. scripts/setup_env.sh: virtualenv .venv with the requirements, and Debian's dataset-fashion-mnist
#      when its files are absent and apt is usable (otherwise it says how to install it);
#   2. trains CIFAR ResNet-20 on Fashion-MNIST with static convolution, PEDConv and DY-Conv (K=4), same
#      recipe (configs/fashion_mnist/{static,pedconv,dyconv}.yaml: BatchNorm statistics recomputed over 20
#      training batches before each test, --precise-bn) and seed, a short schedule, with progress bars;
#   3. measures PEDConv against static on ResNet-18 at 224 px (batch-1 latency, train step), where the
#      paper makes its cost claim;
#   4. prints a table (test top-1, parameters and their ratio to static, MACs, train img/s, batch-1 latency
#      and train step vs static), what it shows and what it cannot, and writes
#      logs/quickstart/quickstart.{md,csv,png} (the PNG holds the learning curves).
# Budget: under 15 minutes on 2 CPU cores, setup included (see README, "Quick start", for the timing).
# Usage: bash scripts/quickstart.sh [extra fashion_mnist_study.py flags, e.g. --epochs 3]
# Environment: VENV (default .venv), FASHION_MNIST (default /usr/share/datasets/fashion-mnist).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup_env.sh
VENV=${VENV:-.venv}
DATA=${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
if [ ! -f "$DATA/train-images-idx3-ubyte.gz" ]; then
  echo "error: Fashion-MNIST not found in $DATA. Install it with: sudo apt-get install dataset-fashion-mnist" >&2
  echo "       (or put the four *-ubyte.gz files in a directory and set FASHION_MNIST=/that/directory)" >&2
  exit 1
fi
echo "[quickstart] training static conv, PEDConv and DY-Conv ResNet-20 on Fashion-MNIST (default: 2 epochs on 6000 images each), then PEDConv / static on ResNet-18"
"$VENV/bin/python" scripts/fashion_mnist_study.py \
  --data "$DATA" --ops static,pedconv,dyconv --seeds 0 --epochs 2 --train-subset 6000 --val-subset 5000 \
  --latency-images 100 --imagenet-cost resnet18 --logs logs/quickstart/runs --out logs/quickstart --name quickstart "$@"
elapsed=$(( $(date +%s) - start ))
echo "[quickstart] done in $((elapsed / 60)) min $((elapsed % 60)) s; learning curves: logs/quickstart/quickstart.png," \
  "table: logs/quickstart/quickstart.md"
