"""Session-wide test set-up.

Without CUDA, the fused Triton PEDConv kernels (image_classification/dynamic/triton_pedconv.py) are
tested in Triton's interpreter, which must be switched on before triton is first imported (Triton
decorates its own standard-library functions at import time). So it is set here, before any test
module is collected. CPU code paths never import triton, and with CUDA nothing is changed.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
