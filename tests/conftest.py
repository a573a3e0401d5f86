"""Session-wide test set-up.

- Tests marked ``cuda`` are skipped without a CUDA device (``bash scripts/gpu_checks.sh`` runs them on a GPU).
- PEDConv's path autotuner is off (``path=auto`` uses its deterministic shape heuristic). Set in the
  environment, so that ``main.py`` subprocesses inherit it; tests of the autotuner switch it on explicitly
  (``autotune.set_autotune(True)``, or ``PEDCONV_AUTOTUNE=1`` for a subprocess).
- The PEDConv path cache (``PEDCONV_CACHE_DIR``) points at a fresh temporary directory.
- Without CUDA, the fused Triton PEDConv kernels (image_classification/dynamic/pedconv/triton.py) are
  tested in Triton's interpreter, which must be switched on before triton is first imported (Triton
  decorates its own standard-library functions at import time). So it is set here, before any test
  module is collected. CPU code paths never import triton, and with CUDA nothing is changed.
- Every test starts from the same global random state (torch, random, numpy seeded with
  ``PYTEST_SEED``, default 0): a test's outcome must not depend on which tests ran before it on the same
  worker. Running the suite with another ``PYTEST_SEED`` shows tests whose tolerance depends on an unseeded
  input.
- Under pytest-xdist (``scripts/run_tests.sh`` runs ``-n 2``), each worker gets its share of the CPU cores
  for torch's intra-op threads (and for the ``main.py`` subprocesses it starts, via ``OMP_NUM_THREADS``),
  so that the workers do not oversubscribe the machine.
"""

import os
import random

import pytest
import torch

os.environ.setdefault("PEDCONV_AUTOTUNE", "0")
# tests that switch tuning on must neither read nor fill the user's PEDConv path cache (~/.cache/pedconv)
if "PEDCONV_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["PEDCONV_CACHE_DIR"] = tempfile.mkdtemp(prefix="pedconv-cache-")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _WORKERS > 1:
    _threads = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _same_random_state_for_every_test():
    seed = int(os.environ.get("PYTEST_SEED", "0"))
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass
    yield


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Skip ``@pytest.mark.cuda`` tests when CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run by scripts/gpu_checks.sh on a GPU)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def pytest_addoption(parser) -> None:
    parser.addoption("--update-recipe-snapshot", action="store_true", default=False,
                     help="rewrite tests/recipe_snapshot.json from the recipes under configs/ (tests/test_configs.py)")
