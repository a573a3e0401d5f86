"""Batch-1 inference of PEDConv: the whole CP tensor folded into the weight (one dense conv,
:func:`weight_folded_conv`) or the scaled patches in one GEMM (:func:`gemm_batch1`); :func:`batch1_plan` picks."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import Geometry, as_matrix, conv_out_hw, is_pointwise, mul_temporary

__all__ = ["batch1_plan", "folded_batch1", "gemm_batch1", "weight_folded_conv"]


def batch1_plan(engine: str, weight_shape: Sequence[int], out_hw: Tuple[int, int],
                has_outer: bool) -> Tuple[bool, bool]:
    """(gamma on the weight, phi (x) psi on the patches) of :func:`weight_folded_conv` (``engine`` "conv")
    or :func:`gemm_batch1` ("gemm") for one sample: each factor scales the smaller tensor it can.

    ``phi (x) psi`` (present when ``has_outer``) scales the weight, except on the GEMM engine when the
    weight (C_out x K) is larger than the patches (K x L). gamma joins a scaled weight while the weight
    is no larger than the output (C_out x L), and scales the output otherwise (Eq. 3: a per-output-channel
    factor commutes with the convolution).
    """
    cout, cin_g, kh, kw = (int(s) for s in weight_shape)
    length = out_hw[0] * out_hw[1]
    on_patches = engine == "gemm" and has_outer and cout > length
    return (not on_patches and cin_g * kh * kw <= length), on_patches


def _gamma_view(gamma: Optional[Tensor], cout: int, on_weight: bool) -> Optional[Tensor]:
    """gamma (any layout with C_out entries) as C_out x 1 x 1 x 1 (scales the weight) or C_out x 1 x 1 (the output)."""
    if gamma is None:
        return None
    return gamma.view(cout, 1, 1, 1) if on_weight else gamma.view(cout, 1, 1)


def folded_batch1(x: Tensor, weight: Tensor, gamma: Optional[Tensor], phi: Optional[Tensor], psi: Optional[Tensor],
                   geometry: Geometry, engine: str = "conv") -> Tensor:
    """:func:`weight_folded_conv` / :func:`gemm_batch1` from rank-1 factors laid out 1 x dim (or 1 x 1 x dim).

    Under ``torch.compile`` a groups-1 layer whose weight is larger than its patch matrix takes the GEMM
    with scaled patches whatever the path: the weight then stays a constant, which inductor's freezing
    pre-packs once, where a folded weight would be re-laid out on every call (ResNet-18's 256-channel
    14x14 layer, compiled with freezing: 2.0 ms against 3.3 ms; static 1.8 ms).
    """
    cout, cin_g, kh, kw = weight.shape
    out_hw = conv_out_hw(x.shape[2], x.shape[3], (kh, kw), geometry)
    if (engine == "conv" and geometry[3] == 1 and cout > out_hw[0] * out_hw[1] and (phi is not None or psi is not None)
            and torch.compiler.is_compiling()):
        engine = "gemm"
    on_weight, on_patches = batch1_plan(engine, weight.shape, out_hw, phi is not None or psi is not None)
    run = gemm_batch1 if engine == "gemm" else weight_folded_conv
    return run(x, weight, _gamma_view(gamma, cout, on_weight), None if phi is None else phi.view(cin_g, 1, 1),
               None if psi is None else psi.view((kh * kw, 1) if on_patches else (kh, kw)), geometry)


def _outer(phi: Optional[Tensor], psi: Optional[Tensor]) -> Optional[Tensor]:
    """phi (x) psi as C_in/g x kh x kw (against the weight) or C_in/g x kk x 1 (against the patches), from
    the broadcastable views; or the one present, or None."""
    if phi is not None and psi is not None:
        return phi * psi
    return phi if phi is not None else psi


def _scaled_weight(weight: Tensor, outer: Optional[Tensor], gamma: Optional[Tensor]) -> Tensor:
    """``W * outer`` (and ``* gamma`` when gamma is laid out against the weight, C_out x 1 x 1 x 1), a temporary."""
    if gamma is not None and gamma.dim() == 4:  # gamma laid out against the weight
        if outer is None:
            return mul_temporary(weight, gamma, weight.shape)
        return mul_temporary(weight, outer, weight.shape).mul_(gamma)
    return weight if outer is None else mul_temporary(weight, outer, weight.shape)


def _output_gamma(y: Tensor, gamma: Optional[Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """``y`` (1 x C_out x H x W) times gamma laid out against the output (C_out x 1 x 1), in place when eager,
    plus ``bias`` (C_out) when given and not already added (``gamma`` on the weight: the product added it)."""
    if gamma is None or gamma.dim() == 4:
        return y
    if bias is not None:
        return torch.addcmul(bias.view(-1, 1, 1), y, gamma)
    return y * gamma if torch.compiler.is_compiling() else y.mul_(gamma)  # times_inplace inlined: batch-1 hot path


def weight_folded_conv(x: Tensor, weight: Tensor, gamma: Optional[Tensor], phi: Optional[Tensor],
                       psi: Optional[Tensor], geometry: Geometry, bias: Optional[Tensor] = None) -> Tensor:
    """One sample of Eq. 2, ``conv(x, W * (gamma (x) phi (x) psi))``, as ONE dense convolution (inference).

    ``x`` is 1 x C_in x H x W; ``phi`` C_in/g x 1 x 1 and ``psi`` kh x kw broadcast against W; ``gamma``
    is C_out x 1 x 1 x 1 to scale the weight or C_out x 1 x 1 to scale the output (:func:`batch1_plan`
    says which is cheaper); None for a left-out component. ``W * (phi (x) psi)`` is one pass over the
    weight into the scratch buffer, so the activations are read once, by the convolution: at most 3
    elementwise ops and the conv, whatever the layer. A static ``bias`` (C_out, e.g. a folded BatchNorm's
    shift) rides on the convolution, or on gamma's product when gamma scales the output.
    """
    stride, padding, dilation, groups = geometry
    kernel = _scaled_weight(weight, _outer(phi, psi), gamma)
    on_output = gamma is not None and gamma.dim() != 4
    y = F.conv2d(x, kernel, None if on_output else bias, stride, padding, dilation, groups)
    return _output_gamma(y, gamma, bias)


def gemm_batch1(x: Tensor, weight: Tensor, gamma: Optional[Tensor], phi: Optional[Tensor], psi: Optional[Tensor],
                geometry: Geometry, bias: Optional[Tensor] = None) -> Tensor:
    """One sample of Eq. 2 as ONE matrix product of the weight (C_out x K) and the patches (K x L), groups 1.

    Factors laid out as for :func:`weight_folded_conv`, except that when :func:`batch1_plan` puts
    ``phi (x) psi`` on the patches (they are the smaller), psi is kk x 1 and gamma (C_out x 1 x 1) scales
    the output. A 1x1 stride-1 kernel's patches are the input itself. ``bias`` as for
    :func:`weight_folded_conv`.
    """
    cout, cin_g, kh, kw = weight.shape
    ho, wo = conv_out_hw(x.shape[2], x.shape[3], (kh, kw), geometry)
    k, length = cin_g * kh * kw, ho * wo
    pointwise = is_pointwise(x, weight, geometry)
    unfolded = None if pointwise else F.unfold(x, (kh, kw), geometry[2], geometry[1], geometry[0])
    outer = _outer(phi, psi)
    if outer is not None and cout > length:  # batch1_plan: phi (x) psi on the patches, gamma on the output
        # patches as 1 x C_in/g x kk x L (the input itself for 1x1), scaled into the scratch buffer
        patches = x if unfolded is None else unfolded.view(1, cin_g, kh * kw, length)
        scaled = mul_temporary(patches, outer, patches.shape)
        y = torch.mm(weight.reshape(cout, k), as_matrix(scaled, (k, length)))  # a copy for channels_last W
        if gamma is not None and gamma.dim() == 4:
            gamma = gamma.view(cout, 1, 1)
    else:
        patches = (x if unfolded is None else unfolded).view(k, length)
        kernel = as_matrix(_scaled_weight(weight, outer, gamma), (cout, k))
        if bias is not None and (gamma is None or gamma.dim() == 4):
            return torch.addmm(bias.view(cout, 1), kernel, patches).view(1, cout, ho, wo)
        y = torch.mm(kernel, patches)
    if bias is not None and gamma is None:
        return y.add_(bias.view(cout, 1)).view(1, cout, ho, wo)
    return _output_gamma(y.view(1, cout, ho, wo), gamma, bias)


