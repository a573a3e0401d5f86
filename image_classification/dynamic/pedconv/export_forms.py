"""PEDConv's export forms: exact paths whose convolutions all take constant weights (PEDConv, BMVC 2021, Eq. 2).

A runtime such as ONNX Runtime or TensorRT is fast when each convolution's weight is a constant initializer
(pre-packed into the runtime's blocked layout, a tactic chosen for it). PEDConv's per-sample weight
``W_base * (gamma (x) phi (x) psi)`` is not, and with a dynamic batch it cannot be one grouped convolution
(ONNX ``Conv.group`` is a constant). The forms below keep the batch a plain axis and ``W_base`` constant;
gamma and phi scale output and input channels as multiplications on activations, and psi, which scales the
k*k kernel taps per sample, is applied where the k*k taps are separate channels:

* ``expand``: the k*k shifted copies of every input channel made by ONE constant-weight convolution (a 0/1
  tap selector, ``groups = C_in``, carrying stride, padding and dilation), scaled by psi per sample, then ONE
  1x1 convolution with ``W_base`` reshaped to ``C_out x (C_in/g * k*k)``.
* ``shift``: the psi-scaled copies of the phi-scaled input as one broadcast multiplication (tap-major), a
  depthwise 0/1 shift convolution (channel multiplier 1, which runtimes run in their blocked layout), then ONE
  1x1 convolution with ``W_base`` permuted to the tap-major order.
* ``cols``: the same constant selector convolution as ``expand`` gives the patch matrix (im2col), and a
  batched matrix product with ``W_base * (gamma (x) phi (x) psi)`` per sample (small where the channels are
  few and the maps large, e.g. ResNet's 64-channel 56x56 stage); the only convolution is the selector.
* ``factored`` (:mod:`.paths`): k*k shifted 1x1 convolutions, one per tap.

Every form is a registered path (``pedconv:path=expand`` runs it in PyTorch too) with ``tune=False``: the
training autotuner never picks them; the export chooses one per layer (:func:`form_rule`, or by timing the
candidates in ONNX Runtime: :mod:`image_classification.measurement.onnx_runtime`). 1x1 kernels and layers
without psi run one constant convolution with channel scalings in every form.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import PEDConvLayer
from .paths import Factors, PathSpec, activation_scaled, register_path, run_additive, sum_terms

__all__ = ["EXPORT_FORMS", "SELECTOR_BUFFERS", "applicable_forms", "form_rule", "tap_selector"]

#: the export forms, in the order the export tries them (``factored`` last: the slowest almost everywhere)
EXPORT_FORMS: Tuple[str, ...] = ("cols", "expand", "shift", "factored")
#: non-persistent buffer names under which an export keeps a layer's 0/1 selectors (constant initializers in
#: the exported graph; never in a state dict)
SELECTOR_BUFFERS: Dict[bool, str] = {False: "export_tap_selector", True: "export_shift_selector"}


def tap_selector(in_channels: int, groups: int, kernel_size: Tuple[int, int], tap_major: bool,
                 like: Tensor) -> Tensor:
    """The 0/1 weight of the selector convolution, ``(C_in * k*k) x 1 x kh x kw``.

    ``tap_major=False`` (``expand``/``cols``, ``groups = C_in``): output channel ``c * k*k + t`` copies input
    channel ``c`` shifted by tap ``t`` (the order of ``W_base.reshape(C_out, -1)``). ``tap_major=True``
    (``shift``, depthwise): channel ``(j * k*k + t) * C_in/g + c`` of the tap-major copies of group ``j`` is
    shifted by tap ``t``.
    """
    kh, kw = kernel_size
    kk = kh * kw
    eye = torch.eye(kk, dtype=like.dtype, device=like.device)
    if not tap_major:
        return eye.view(1, kk, kh, kw).expand(in_channels, kk, kh, kw).reshape(in_channels * kk, 1, kh, kw)
    cin_g = in_channels // groups
    return eye.view(1, kk, 1, kh, kw).expand(groups, kk, cin_g, kh, kw).reshape(in_channels * kk, 1, kh, kw)


def _selector(layer: PEDConvLayer, tap_major: bool, like: Tensor) -> Tensor:
    """The layer's export buffer when it holds one (a constant of the exported graph), else built here."""
    buffers = getattr(layer, "_buffers", {})
    held: Optional[Tensor] = buffers.get(SELECTOR_BUFFERS[tap_major])
    if held is not None and held.dtype == like.dtype and held.device == like.device:
        return held
    return tap_selector(layer.in_channels, layer.groups, layer.kernel_size, tap_major, like)


def _psi_expand(layer: PEDConvLayer, u: Tensor, weight: Tensor, psi: Tensor) -> Tensor:
    """``expand``: selector conv (k*k shifted copies), psi per (sample, tap), one 1x1 conv with W_base."""
    batch, cin = u.shape[0], layer.in_channels
    kk = layer.kernel_size[0] * layer.kernel_size[1]
    z = F.conv2d(u, _selector(layer, False, u), None, layer.stride, layer.padding, layer.dilation, groups=cin)
    ho, wo = z.shape[2], z.shape[3]
    z = (z.view(batch, cin, kk, ho, wo) * psi.view(batch, 1, kk, 1, 1)).view(batch, cin * kk, ho, wo)
    return F.conv2d(z, weight.reshape(layer.out_channels, -1, 1, 1), None, groups=layer.groups)


def _psi_shift(layer: PEDConvLayer, u: Tensor, weight: Tensor, psi: Tensor) -> Tensor:
    """``shift``: tap-major psi-scaled copies (one broadcast Mul), depthwise 0/1 shifts, one 1x1 conv."""
    # channel counts from the layer, not the tensor: an exporter then sees constant kernel shapes
    batch, height, width = u.shape[0], u.shape[2], u.shape[3]
    cin, groups = layer.in_channels, layer.groups
    kk = layer.kernel_size[0] * layer.kernel_size[1]
    copies = u.view(batch, groups, 1, cin // groups, height, width) * psi.view(batch, 1, kk, 1, 1, 1)
    z = F.conv2d(copies.reshape(batch, kk * cin, height, width), _selector(layer, True, u), None, layer.stride,
                 layer.padding, layer.dilation, groups=kk * cin)
    cout = layer.out_channels
    w = weight.reshape(cout, cin // groups, kk).transpose(1, 2).reshape(cout, -1, 1, 1)  # tap-major per group
    return F.conv2d(z, w, None, groups=groups)


def _run_cols(layer: PEDConvLayer, x: Tensor, weight: Tensor, f: Factors) -> Tensor:
    """``cols``: patches by the selector conv, one batched matmul with the per-sample scaled W_base."""
    if layer.reparam == "additive":
        return run_additive(layer, x, weight, f)
    batch, cin = x.shape[0], layer.in_channels
    cout, groups = layer.out_channels, layer.groups
    kk = layer.kernel_size[0] * layer.kernel_size[1]
    (sh, sw), (ph, pw) = layer.stride, layer.padding
    if kk == 1 and ph == 0 and pw == 0:  # 1x1: the patches are the (strided) input itself
        z = x if sh == sw == 1 else x[:, :, ::sh, ::sw]
    else:
        z = F.conv2d(x, _selector(layer, False, x), None, layer.stride, layer.padding, layer.dilation, groups=cin)
    ho, wo = z.shape[2], z.shape[3]
    cols = z.reshape(batch, groups, (cin // groups) * kk, ho * wo)
    w = weight.reshape(groups, cout // groups, (cin // groups) * kk)
    depthwise = cin == groups and cout == groups  # one input and one output channel per group

    def term(gamma: Optional[Tensor], phi: Optional[Tensor], psi: Optional[Tensor]) -> Tensor:
        # W_base's columns (input channel, tap) scaled by phi (x) psi, its rows by gamma, per sample
        wb = w
        col = None if phi is None else phi.view(batch, cin // groups, 1)
        if psi is not None:
            col = psi.view(batch, 1, kk) if col is None else col * psi.view(batch, 1, kk)
        if col is not None:
            wb = wb * col.expand(batch, cin // groups, kk).reshape(batch, 1, 1, -1)
        if gamma is not None:
            wb = wb * gamma.view(batch, groups, cout // groups, 1)
        if depthwise:  # C products of 1 x k*k by k*k x L: a multiplication and a sum over the taps
            return (cols * wb.reshape(batch, groups, kk, 1)).sum(2).view(batch, cout, ho, wo)
        return torch.matmul(wb, cols).view(batch, cout, ho, wo)

    return sum_terms(layer, f, term)


def _kxk_with_psi(layer: PEDConvLayer) -> bool:
    return layer.kernel_size[0] * layer.kernel_size[1] > 1 and "psi" in layer.components


def applicable_forms(layer: PEDConvLayer) -> Tuple[str, ...]:
    """The forms that differ for this layer: 1x1 kernels or no psi leave ``cols`` (the per-sample weight's product)
    and ``factored`` (one constant conv with channel scalings)."""
    return EXPORT_FORMS if _kxk_with_psi(layer) else ("cols", "factored")


def form_rule(layer: PEDConvLayer, input_shape: Sequence[int]) -> str:
    """The export form when candidates are not timed: a shape rule from ONNX Runtime timings on a 2-core x86 CPU
    (docs/deployment.md). ``cols`` while the per-sample weight is small next to the patch matrix (``C_out <=
    H_out W_out / 4``: ResNet's 56x56 and 28x28 stages), ``shift`` on small maps (``H_out W_out <= 64``, where its
    depthwise shift is cheap and the weight large), ``expand`` otherwise."""
    if not _kxk_with_psi(layer):
        return "factored"
    ho, wo = layer.output_size(int(input_shape[2]), int(input_shape[3]))
    if layer.out_channels * 4 <= ho * wo:
        return "cols"
    return "shift" if ho * wo <= 64 else "expand"


register_path(PathSpec("expand", activation_scaled(_psi_expand),
                       "export form: k*k tap copies by one 0/1 conv, psi Mul, one 1x1 conv with W_base", tune=False))
register_path(PathSpec("shift", activation_scaled(_psi_shift),
                       "export form: psi-scaled tap-major copies, depthwise 0/1 shifts, one 1x1 conv with W_base",
                       tune=False))
register_path(PathSpec("cols", _run_cols,
                       "export form: patches by one 0/1 conv, batched matmul with the per-sample scaled W_base",
                       tune=False))
