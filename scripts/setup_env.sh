#!/usr/bin/env bash
# Set up everything this project needs on a fresh machine, idempotently:
#   - a virtualenv in .venv with requirements-dev.txt (torch, torchvision, DALI, pytest, ruff, ...);
#   - Debian's dataset-fashion-mnist package when its files are absent and apt is usable.
# Usage: bash scripts/setup_env.sh        (VENV=/path overrides the virtualenv location)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha"
want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing requirements-dev.txt into $VENV (torch installs from local disk, about a minute)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements-dev.txt 2>&1 | grep -v "is ignored: it is neither" || true
  "$VENV/bin/python" -c "import torch, torchvision, yaml, tqdm, pytest" || { echo "[setup] error: requirements did not install" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian package dataset-fashion-mnist"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "[setup] warning: could not install dataset-fashion-mnist; run: sudo apt-get install dataset-fashion-mnist" >&2
  else
    echo "[setup] note: Fashion-MNIST not found at $FMNIST; install it with: sudo apt-get install dataset-fashion-mnist" >&2
  fi
fi
echo "[setup] ready: $VENV/bin/python; to run the README's python commands in it: source $VENV/bin/activate"
