"""Closed-form counts of one PEDConv layer (PEDConv, BMVC 2021, Sec. 3 complexity) and the batch sums of its
per-sample weights computed from the CP factors (for the weight-variation analysis)."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor

from .common import MIN_HIDDEN, PEDConvLayer

__all__ = ["pedconv_layer_macs", "pedconv_layer_params", "pedconv_weight_sums"]


def pedconv_layer_macs(c_in: int, c_out: int, k: int, out_hw: Sequence[int], groups: int = 1, hidden: int = 0,
                       rank: int = 1, reduction: int = 16) -> int:
    """PEDConv, BMVC 2021, Sec. 3 complexity: ``HW C_out C_in k^2 + (2C_in + C_out + k^2) C_in/r + 2R C_out C_in k^2``.

    ``C_in / g`` replaces ``C_in`` in the conv, the input-side head and the scaling for grouped
    convs; ``hidden`` (default ``C_in // r``) is the generator bottleneck; rank R multiplies heads
    and scaling.
    """
    hidden = hidden or max(MIN_HIDDEN, c_in // reduction)
    cin_g = c_in // groups
    generator = c_in * hidden + hidden * rank * (c_out + cin_g + k * k)
    return int(out_hw[0]) * int(out_hw[1]) * c_out * cin_g * k * k + generator + 2 * rank * c_out * cin_g * k * k


def pedconv_layer_params(c_in: int, c_out: int, k: int, groups: int = 1, hidden: int = 0, rank: int = 1,
                         reduction: int = 16) -> int:
    """Deploy parameters of one PEDConv layer (no conv bias): base weight + generator with biases."""
    hidden = hidden or max(MIN_HIDDEN, c_in // reduction)
    heads = rank * (c_out + c_in // groups + k * k)
    return c_out * (c_in // groups) * k * k + c_in * hidden + hidden + hidden * heads + heads


def _cp_products(a: Tensor, b: Tensor, c: Tensor, square: bool) -> Tensor:
    """``sum_b c_b`` (or ``sum_b c_b^2``) of the rank-R CP tensors ``c_b = sum_r a_br o b_br o c_br``."""
    if not square:
        return torch.einsum("bro,bri,brt->oit", a, b, c)
    # c_b^2 = sum_{r,s} (a_r a_s) o (b_r b_s) o (c_r c_s)
    aa = a[:, :, None] * a[:, None]
    bb = b[:, :, None] * b[:, None]
    cc = c[:, :, None] * c[:, None]
    return torch.einsum("brso,brsi,brst->oit", aa, bb, cc)


def pedconv_weight_sums(module: PEDConvLayer, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(sum_b W(x_b), sum_b W(x_b)^2, per-sample ||W(x_b)||_F) of a PEDConv layer from its factors, in float64,
    without materialising the B per-sample weights (the CP products are summed over the batch first)."""
    gamma, phi, psi = (f.double() for f in module.factors(x))  # B x R x dim each
    weight = module.weight.detach().double()
    shape = weight.shape
    w = weight.reshape(shape[0], shape[1], -1)  # O x I x T
    s1 = _cp_products(gamma, phi, psi, square=False)
    s2 = _cp_products(gamma, phi, psi, square=True)
    batch = x.shape[0]
    # per-sample sum_oit w^2 c_b^2 (multiplicative) through the same pair expansion, one sample at a time
    norms = []
    for i in range(batch):
        g, p, k = gamma[i:i + 1], phi[i:i + 1], psi[i:i + 1]
        c1 = _cp_products(g, p, k, square=False)
        c2 = _cp_products(g, p, k, square=True)
        if module.reparam == "multiplicative":
            norms.append(float((w * w * c2).sum()))
        else:
            norms.append(float((w * w + 2 * w * c1 + c2).sum()))
    norms_t = torch.tensor(norms, dtype=torch.float64).clamp_min(0).sqrt()
    if module.reparam == "multiplicative":
        total, squares = w * s1, w * w * s2
    else:
        total, squares = batch * w + s1, batch * w * w + 2 * w * s1 + s2
    return total.reshape(shape), squares.reshape(shape), norms_t


