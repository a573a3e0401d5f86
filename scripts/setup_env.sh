#!/usr/bin/env bash
# Set up everything this project needs on a fresh machine, idempotently:
#   - a virtualenv in .venv with requirements-dev.txt (torch, torchvision, DALI, pytest, ruff, ...);
#   - Debian's dataset-fashion-mnist package when its files are absent and apt is usable.
# Usage: bash scripts/setup_env.sh        (VENV=/path overrides the virtualenv location)
#        bash scripts/setup_env.sh --oldest-torch
#            the same in .venv-oldest, with the oldest supported torch/torchvision of requirements-oldest.txt
#            in place of requirements.txt's pins (CI's second leg; the wheels come from the package registry
#            with their CUDA libraries, about 3 GB, 1.5 min on CI's machine)
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST=0
for arg in "$@"; do
  case "$arg" in
    --oldest-torch) OLDEST=1 ;;
    *) echo "[setup] error: unknown argument $arg (valid: --oldest-torch)" >&2; exit 2 ;;
  esac
done
if [ "$OLDEST" = 1 ]; then VENV=${VENV:-.venv-oldest}; else VENV=${VENV:-.venv}; fi
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha"
want=$(cat requirements.txt requirements-dev.txt requirements-oldest.txt | sha256sum | cut -d' ' -f1)-$OLDEST
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if [ "$OLDEST" = 1 ]; then
    # requirements-dev.txt with requirements.txt's torch/torchvision pins swapped for requirements-oldest.txt's
    # (the same filter as the Dockerfile's, which keeps the container's torch)
    reqs="$VENV/requirements-oldest-leg.txt"
    { cat requirements-oldest.txt
      grep -v -E '^[[:space:]]*(torch|torchvision)[[:space:]]*([=<>!~;[]|$)' requirements.txt
      grep -v -E '^[[:space:]]*-r[[:space:]]+requirements\.txt' requirements-dev.txt; } > "$reqs"
    echo "[setup] installing requirements-oldest.txt and requirements-dev.txt into $VENV (torch from the package registry, a few minutes)"
  else
    reqs=requirements-dev.txt
    echo "[setup] installing requirements-dev.txt into $VENV (torch installs from local disk: about a minute on a quiet machine, up to five on a loaded one)"
  fi
  log="$VENV/pip-install.log"
  status=0
  # pip -q is silent for minutes: a line every 30 s (SETUP_HEARTBEAT_S) says it is still working and where its log is
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$reqs" > "$log" 2>&1 &
  pip_pid=$!
  started=$SECONDS
  while kill -0 "$pip_pid" 2>/dev/null; do
    for _ in $(seq "${SETUP_HEARTBEAT_S:-30}"); do kill -0 "$pip_pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pip_pid" 2>/dev/null; then
      echo "[setup] still installing ($(( SECONDS - started )) s so far; pip's output: $log)"
    fi
  done
  wait "$pip_pid" || status=$?
  grep -v "is ignored: it is neither" "$log" || true
  [ "$status" = 0 ] || { echo "[setup] error: pip install -r $reqs failed (exit $status; output above)" >&2; exit 1; }
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
