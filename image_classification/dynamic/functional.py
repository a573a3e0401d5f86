"""Functional pieces the operators share: the conv output size, an eval-mode BatchNorm as an affine map, and
convolution with a different weight for every sample of the batch, two exact ways.

``per_sample_conv2d(x, weight)`` computes ``y[b] = conv2d(x[b], weight[b])`` for a per-sample weight
``B x C_out x C_in/g x kh x kw``:

* ``grouped`` - one grouped convolution over the batch folded into channels (``groups = B * groups``;
  a plain convolution at batch 1). Fast where cuDNN/oneDNN run grouped convs well, but the batch
  becomes part of the convolution's ``groups`` attribute, which an exported graph with a dynamic
  batch axis cannot have (ONNX ``Conv.group`` is a constant).
* ``unfold`` - ``F.unfold`` patches (B x C_in*kh*kw x L) and one batched matmul with the per-sample
  weights (B x C_out x C_in/g*kh*kw); every op keeps the batch as a plain leading axis, so it exports
  with a dynamic batch (the operators' export path for kernel mixtures).

Both equal the per-sample loop ``torch.cat([F.conv2d(x[b:b+1], weight[b], ...)])``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

__all__ = ["PER_SAMPLE_METHODS", "batchnorm_affine", "conv_output_size", "per_sample_conv2d"]

PER_SAMPLE_METHODS = ("grouped", "unfold")


def conv_output_size(size: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int]) -> Tuple[int, int]:
    """nn.Conv2d's output size formula for an input of spatial ``size``."""
    out = [(n + 2 * p - d * (k - 1) - 1) // s + 1
           for n, k, s, p, d in zip(size, kernel_size, stride, padding, dilation)]
    return out[0], out[1]


def batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` of an eval-mode BatchNorm: ``bn(y) == scale * y + shift`` per channel, differentiable in
    its affine parameters (BatchNorm folding detaches them; DCD's released variant trains through them)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("the BatchNorm tracks no running statistics (track_running_stats=False)")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def per_sample_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: int | Tuple[int, int] = 1,
    padding: int | Tuple[int, int] = 0,
    dilation: int | Tuple[int, int] = 1,
    groups: int = 1,
    method: str = "grouped",
) -> torch.Tensor:
    """``y[b] = conv2d(x[b], weight[b]) + bias[b]`` for ``weight`` B x C_out x C_in/g x kh x kw.

    ``bias`` is B x C_out (per sample), C_out (shared) or None; ``method`` is ``grouped`` or ``unfold``
    (see the module docstring).
    """
    if method not in PER_SAMPLE_METHODS:
        raise ValueError(f"per_sample_conv2d: method must be one of {', '.join(PER_SAMPLE_METHODS)}, got {method!r}")
    batch, channels, height, width = x.shape
    # only the batch may be symbolic (export): channel and kernel sizes are constants of the layer
    channels, out_channels = int(channels), int(weight.shape[1])
    kernel = (int(weight.shape[-2]), int(weight.shape[-1]))
    strides, paddings, dilations = _pair(stride), _pair(padding), _pair(dilation)
    if method == "grouped":
        if batch == 1:
            y = F.conv2d(x, weight[0], None, strides, paddings, dilations, groups)
        else:
            y = F.conv2d(x.reshape(1, batch * channels, height, width), weight.reshape(-1, *weight.shape[2:]), None,
                         strides, paddings, dilations, batch * groups)
            y = y.view(batch, out_channels, y.shape[-2], y.shape[-1])
    else:
        ho, wo = conv_output_size((int(height), int(width)), kernel, strides, paddings, dilations)
        patches = F.unfold(x, kernel, dilations, paddings, strides)  # B x C_in*kh*kw x L, channel-major
        cin_g = channels // groups
        w = weight.reshape(batch, groups, out_channels // groups, cin_g * kernel[0] * kernel[1])
        y = torch.matmul(w, patches.reshape(batch, groups, cin_g * kernel[0] * kernel[1], ho * wo))
        y = y.reshape(batch, out_channels, ho, wo)
    if bias is not None:
        y = y + (bias.view(1, -1, 1, 1) if bias.dim() == 1 else bias.view(batch, out_channels, 1, 1))
    return y
