"""Lean, exact kernels of PEDConv's multiplicative convolution (PEDConv, BMVC 2021, Eq. 2-3).

For rank 1 the dynamic convolution factorises (Eq. 3 written per sample b)::

    y_b = conv(x_b, W * (gamma_b (x) phi_b (x) psi_b)) = gamma_b * conv(phi_b * x_b, W * psi_b)

with gamma_b in R^{C_out} scaling output channels, phi_b in R^{C_in/g} scaling input channels (the same
vector in every group) and psi_b in R^{kh*kw} scaling kernel positions. Each kernel below is a
``torch.autograd.Function`` that saves only the layer input ``x``, its own output ``y`` (which the next
BatchNorm saves anyway, so it costs nothing extra) and the small factors, and recomputes scaled copies,
patches and per-sample weights in backward. ``grad gamma_b = sum_hw dy_b * y_b / gamma_b`` uses the saved
output (gamma is a sigmoid, > 0; where it underflows to 0 the sigmoid's own gradient is 0 too).

Engines (``engine`` argument of :func:`scaled_conv`):

* ``dense``   - no per-position factor (1x1 kernels, where psi is a scalar folded into gamma, or psi left
  out): ``s * conv(phi * x, W)``, one dense conv forward, one ``convolution_backward`` in backward.
* ``grouped`` - the per-sample kernel ``W * (phi_b (x) psi_b)`` (the C_out-free part of the CP tensor) in
  one grouped conv (``groups = B * g``; a dense conv at batch 1), gamma on the output; backward gets the
  per-sample kernel gradient from ``convolution_backward`` and reduces it.
* ``loop``    - one dense conv per sample with its kernel ``W * (phi_b (x) psi_b)``, gamma on the output:
  dense-conv efficiency at any batch; the per-sample kernel and its gradient exist for one sample at
  a time only.
* ``gemm``    - the single-GEMM patch path: the k*k patches of all samples as one
  ``(C_in/g * k*k) x (B*H_out*W_out)`` matrix per group scaled by phi (x) psi, ONE matmul with W_base
  forward and ONE for grad-W; no per-sample weight or per-sample weight gradient is ever built. For
  ``groups == 1`` and batch > 1 the matrix is built channels-last (rows of k*k*C_in from shifted windows
  of the NHWC input: dense copies) and the output is a channels_last tensor.

:func:`materialized_conv` is the lean form of the per-sample effective weight (any rank, multiplicative
or additive): ``conv(x_b, W (*|+) sum_r gamma_r (x) phi_r (x) psi_r)`` as one grouped conv (a batched
matmul for 1x1 kernels), saving only ``x`` and the factors and rebuilding the weights in backward.

Without autograd (inference, ``torch.no_grad``) the same forward functions run directly, without the
Functions' bookkeeping. At batch 1 every engine but ``gemm`` is one dense convolution with the whole
CP tensor folded into the weight, :func:`weight_folded_conv` (``W * (gamma (x) phi (x) psi)``: one pass
over the weight instead of passes over activations; gamma goes on the output instead when the output
is the smaller tensor).

Per-sample weights are temporaries that live for one convolution. On the CPU they are written into a
per-thread scratch buffer (:func:`.common.mul_temporary`) instead of fresh allocations: glibc hands a freed
multi-megabyte block back to the kernel, and the next call's fresh block then page-faults once per 4 KiB
page, which measured ~1,000 faults and ~1 ms per ResNet-18 layer at batch 1 (more than the layer's
whole arithmetic overhead).

Every kernel runs in the autocast dtype when autocast is on (inputs cast outside the Function, so
autograd casts the gradients back) and compiles with ``torch.compile(fullgraph=True)``.

The package: :mod:`.common` (geometry, scratch buffer, helpers), :mod:`.scaled` (the four engines of
:func:`scaled_conv`), :mod:`.materialized` (:func:`materialized_conv`), :mod:`.batch1` (the batch-1 forms).
"""

from .batch1 import batch1_plan, gemm_batch1, weight_folded_conv
from .common import ENGINES, SCRATCH_MAX_NUMEL, Geometry, compute_dtype, saved_tensor_bytes
from .materialized import materialized_conv
from .scaled import scaled_conv

__all__ = [
    "ENGINES",
    "Geometry",
    "SCRATCH_MAX_NUMEL",
    "batch1_plan",
    "compute_dtype",
    "gemm_batch1",
    "materialized_conv",
    "saved_tensor_bytes",
    "scaled_conv",
    "weight_folded_conv",
]
