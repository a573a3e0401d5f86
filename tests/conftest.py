"""Session-wide test set-up.

- Tests marked ``cuda`` are skipped without a CUDA device (``bash scripts/gpu_checks.sh`` runs them on a GPU).
- PEDConv's path autotuner is off (``path=auto`` uses its deterministic shape heuristic). Set in the
  environment, so that ``main.py`` subprocesses inherit it; tests of the autotuner switch it on explicitly
  (``autotune.set_autotune(True)``, or ``PEDCONV_AUTOTUNE=1`` for a subprocess).
- Without CUDA, the fused Triton PEDConv kernels (image_classification/dynamic/triton_pedconv.py) are
  tested in Triton's interpreter, which must be switched on before triton is first imported (Triton
  decorates its own standard-library functions at import time). So it is set here, before any test
  module is collected. CPU code paths never import triton, and with CUDA nothing is changed.
"""

import os

import pytest
import torch

os.environ.setdefault("PEDCONV_AUTOTUNE", "0")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
