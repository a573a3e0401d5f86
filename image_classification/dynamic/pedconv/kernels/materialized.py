"""The lean per-sample effective weight of PEDConv, any rank, multiplicative or additive (PEDConv, BMVC 2021, Eq. 2;
Appendix E): :func:`materialized_conv` rebuilds the weights in backward instead of saving them."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .batch1 import folded_batch1
from .common import Geometry, cast, compute_dtype, is_pointwise, mul_temporary, needs_grad
from .scaled import grouped_conv, grouped_conv_backward

__all__ = ["materialized_conv"]


def _materialized_kernels(weight: Tensor, gamma: Tensor, phi: Tensor, psi: Tensor, additive: bool) -> Tensor:
    """W * CP (or W + CP), CP = sum_r gamma_r (x) phi_r (x) psi_r: B x C_out x C_in/g x kh x kw."""
    batch, rank = gamma.shape[:2]
    if rank == 1 and not additive:  # two passes over the B x weight tensor, no separate CP tensor
        outer = (phi.view(batch, -1, 1) * psi.view(batch, 1, -1)).view(batch, 1, weight.shape[1], *weight.shape[2:])
        return mul_temporary(weight.unsqueeze(0), gamma.view(batch, -1, 1, 1, 1), (batch, *weight.shape)).mul_(outer)
    cp = torch.einsum("bro,brc,brk->bock", gamma, phi, psi).reshape(batch, *weight.shape)
    return weight + cp if additive else weight * cp


def _materialized_apply(x: Tensor, kernels: Tensor, geometry: Geometry) -> Tensor:
    if not is_pointwise(x, kernels[0], geometry):
        return grouped_conv(x, kernels, geometry)
    groups = geometry[3]
    batch, channels, height, width = x.shape
    cout = kernels.shape[1]
    y = torch.bmm(kernels.reshape(batch * groups, cout // groups, channels // groups),
                  x.view(batch * groups, channels // groups, height * width))
    return y.view(batch, cout, height, width)


def _materialized_apply_backward(grad: Tensor, x: Tensor, kernels: Tensor, geometry: Geometry, need_x: bool,
                                 need_k: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    if not is_pointwise(x, kernels[0], geometry):
        return grouped_conv_backward(grad, x, kernels, geometry, need_x, need_k)
    groups = geometry[3]
    batch, channels, height, width = x.shape
    cout = kernels.shape[1]
    k_b = kernels.reshape(batch * groups, cout // groups, channels // groups)
    g_b = grad.reshape(batch * groups, cout // groups, height * width)
    grad_x = torch.bmm(k_b.transpose(1, 2), g_b).view(x.shape) if need_x else None
    grad_k = None
    if need_k:
        grad_k = torch.bmm(g_b, x.view(batch * groups, channels // groups, height * width).transpose(1, 2))
        grad_k = grad_k.view(kernels.shape)
    return grad_x, grad_k


def _materialized_forward(x: Tensor, weight: Tensor, gamma: Tensor, phi: Tensor, psi: Tensor, geometry: Geometry,
                          additive: bool) -> Tensor:
    if x.shape[0] == 1 and gamma.shape[1] == 1 and not additive:
        return folded_batch1(x, weight, gamma, phi, psi, geometry)
    return _materialized_apply(x, _materialized_kernels(weight, gamma, phi, psi, additive), geometry)


class _MaterializedConv(torch.autograd.Function):
    """``conv(x_b, W * CP_b)`` (multiplicative) or ``conv(x_b, W + CP_b)`` (additive) as one grouped conv
    (a batched matmul for 1x1 kernels)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, gamma: Tensor, phi: Tensor, psi: Tensor, geometry: Geometry,
                additive: bool) -> Tensor:
        y = _materialized_forward(x, weight, gamma, phi, psi, geometry, additive)
        ctx.geometry, ctx.additive = geometry, additive
        ctx.save_for_backward(x, weight, gamma, phi, psi)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, weight, gamma, phi, psi = ctx.saved_tensors
        geometry, additive = ctx.geometry, ctx.additive
        need_x, need_w, need_gamma, need_phi, need_psi = ctx.needs_input_grad[:5]
        kernels = _materialized_kernels(weight, gamma, phi, psi, additive)
        need_k = need_w or need_gamma or need_phi or need_psi
        grad_x, grad_k = _materialized_apply_backward(grad_y, x, kernels, geometry, need_x, need_k)
        grad_w = grad_gamma = grad_phi = grad_psi = None
        if grad_k is not None:
            flat = grad_k.flatten(3)  # B x C_out x C_in/g x kk
            if need_w:
                if additive:
                    grad_w = grad_k.sum(0)
                else:
                    grad_w = torch.einsum("bock,bro,brc,brk->ock", flat, gamma, phi, psi).view(weight.shape)
            grad_cp = flat if additive else flat * weight.flatten(2)
            if need_gamma:
                grad_gamma = torch.einsum("bock,brc,brk->bro", grad_cp, phi, psi)
            if need_phi:
                grad_phi = torch.einsum("bock,bro,brk->brc", grad_cp, gamma, psi)
            if need_psi:
                grad_psi = torch.einsum("bock,bro,brc->brk", grad_cp, gamma, phi)
        return grad_x, grad_w, grad_gamma, grad_phi, grad_psi, None, None




def materialized_conv(x: Tensor, weight: Tensor, gamma: Tensor, phi: Tensor, psi: Tensor, geometry: Geometry,
                      additive: bool = False) -> Tensor:
    """``conv(x_b, W (*|+) sum_r gamma_r (x) phi_r (x) psi_r)`` (Eq. 2 / Appendix E), lean in memory.

    Factors are B x R x dim (ones for left-out components). Saves x and the factors only.
    """
    dtype = compute_dtype(x)
    if dtype is not None:
        with torch.autocast(x.device.type, enabled=False):
            return materialized_conv(cast(x, dtype), cast(weight, dtype), cast(gamma, dtype), cast(phi, dtype),
                                     cast(psi, dtype), geometry, additive)
    if not needs_grad(x, weight, gamma, phi, psi):
        return _materialized_forward(x, weight, gamma, phi, psi, geometry, additive)
    return _MaterializedConv.apply(x, weight, gamma, phi, psi, geometry, additive)
