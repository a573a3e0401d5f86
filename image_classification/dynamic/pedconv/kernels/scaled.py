"""The lean autograd Functions of the rank-1 multiplicative PEDConv, ``gamma * conv(phi * x, W * psi)`` (PEDConv,
BMVC 2021, Eq. 3): the ``dense``, ``grouped``, ``loop`` and ``gemm`` engines behind :func:`scaled_conv`."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .batch1 import folded_batch1, weight_folded_conv
from .common import (
    ENGINES,
    Geometry,
    cast,
    compute_dtype,
    conv_backward,
    conv_out_hw,
    expand_phi,
    mul_temporary,
    mul_to_contiguous,
    needs_grad,
    reduce_phi,
    scale_grad,
    times_inplace,
)

__all__ = ["grouped_conv", "grouped_conv_backward", "scaled_conv"]


# ------------------------------------------------------------------------------------------- dense
def _dense_forward(x: Tensor, weight: Tensor, phi: Optional[Tensor], scale: Optional[Tensor],
                   geometry: Geometry) -> Tensor:
    """``s * conv(phi * x, W)``; at batch 1 phi and s go on the weight (:func:`weight_folded_conv`)."""
    stride, padding, dilation, groups = geometry
    if x.shape[0] == 1:
        return weight_folded_conv(x, weight, None if scale is None else scale.view(-1, 1, 1, 1),
                                  None if phi is None else phi.view(-1, 1, 1), None, geometry)
    u = x * expand_phi(phi, groups) if phi is not None else x
    y = F.conv2d(u, weight, None, stride, padding, dilation, groups)
    return times_inplace(y, scale.view(scale.shape[0], scale.shape[1], 1, 1)) if scale is not None else y


class _DenseScaledConv(torch.autograd.Function):
    """``y = s * conv(phi * x, W)``: s is B x C_out (gamma, times the scalar psi of a 1x1 kernel)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, phi: Optional[Tensor], scale: Optional[Tensor],
                geometry: Geometry) -> Tensor:
        y = _dense_forward(x, weight, phi, scale, geometry)
        ctx.geometry = geometry
        ctx.save_for_backward(x, weight, phi, scale, y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, weight, phi, scale, y = ctx.saved_tensors
        geometry = ctx.geometry
        groups = geometry[3]
        need_x, need_w, need_phi, need_s = ctx.needs_input_grad[:4]
        grad_z = grad_y * scale.view(*scale.shape, 1, 1) if scale is not None else grad_y
        phi_full = expand_phi(phi, groups) if phi is not None else None
        u = x * phi_full if (phi_full is not None and need_w) else x
        grad_u, grad_w = conv_backward(grad_z, u, weight, geometry, groups, need_x or need_phi, need_w)
        grad_x = grad_phi = grad_s = None
        if need_x:
            assert grad_u is not None  # asked for: need_x
            grad_x = grad_u * phi_full if phi_full is not None else grad_u
        if need_phi and phi is not None:
            grad_phi = reduce_phi((grad_u * x).sum(dim=(2, 3)), groups)
        if need_s and scale is not None:
            grad_s = scale_grad(grad_y, y, scale)
        return grad_x, grad_w, grad_phi, grad_s, None


# ----------------------------------------------------------------------------------------- grouped
def _fold_kernels(weight: Tensor, phi: Optional[Tensor], psi: Tensor) -> Tuple[Tensor, Tensor]:
    """(W * (phi_b (x) psi_b) as B x C_out x C_in/g x kh x kw, the outer product B x C_in/g x kk)."""
    batch = psi.shape[0]
    outer = psi.unsqueeze(1) if phi is None else phi.unsqueeze(2) * psi.unsqueeze(1)
    kernels = mul_temporary(weight.unsqueeze(0), outer.view(batch, 1, outer.shape[1], *weight.shape[2:]),
                             (batch, *weight.shape))
    return kernels, outer


def grouped_conv(u: Tensor, kernels: Tensor, geometry: Geometry) -> Tensor:
    stride, padding, dilation, groups = geometry
    batch, channels, height, width = u.shape
    if batch == 1:
        return F.conv2d(u, kernels[0], None, stride, padding, dilation, groups)
    out = F.conv2d(u.reshape(1, batch * channels, height, width), kernels.reshape(-1, *kernels.shape[2:]), None,
                   stride, padding, dilation, batch * groups)
    return out.view(batch, kernels.shape[1], out.shape[-2], out.shape[-1])


def grouped_conv_backward(grad: Tensor, u: Tensor, kernels: Tensor, geometry: Geometry, need_input: bool,
                           need_weight: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients of :func:`grouped_conv` wrt u (B x C x H x W) and the per-sample kernels."""
    groups = geometry[3]
    batch, channels, height, width = u.shape
    if batch == 1:
        gu, gk = conv_backward(grad, u, kernels[0], geometry, groups, need_input, need_weight)
        return gu, (gk.unsqueeze(0) if gk is not None else None)
    gu, gk = conv_backward(grad.reshape(1, -1, grad.shape[-2], grad.shape[-1]),
                            u.reshape(1, batch * channels, height, width), kernels.reshape(-1, *kernels.shape[2:]),
                            geometry, batch * groups, need_input, need_weight)
    if gu is not None:
        gu = gu.view(batch, channels, height, width)
    if gk is not None:
        gk = gk.view(kernels.shape)
    return gu, gk


def _grouped_forward(x: Tensor, weight: Tensor, phi: Optional[Tensor], psi: Tensor, gamma: Optional[Tensor],
                     geometry: Geometry) -> Tensor:
    if x.shape[0] == 1:
        return folded_batch1(x, weight, gamma, phi, psi, geometry)
    y = grouped_conv(x, _fold_kernels(weight, phi, psi)[0], geometry)
    return times_inplace(y, gamma.view(gamma.shape[0], gamma.shape[1], 1, 1)) if gamma is not None else y


class _GroupedScaledConv(torch.autograd.Function):
    """``y = gamma * conv_b(x, W * (phi_b (x) psi_b))``: the C_out-free part per sample, one grouped conv."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, phi: Optional[Tensor], psi: Tensor, gamma: Optional[Tensor],
                geometry: Geometry) -> Tensor:
        y = _grouped_forward(x, weight, phi, psi, gamma, geometry)
        ctx.geometry = geometry
        ctx.save_for_backward(x, weight, phi, psi, gamma, y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, weight, phi, psi, gamma, y = ctx.saved_tensors
        geometry = ctx.geometry
        need_x, need_w, need_phi, need_psi, need_gamma = ctx.needs_input_grad[:5]
        grad_z = grad_y * gamma.view(*gamma.shape, 1, 1) if gamma is not None else grad_y
        kernels, outer = _fold_kernels(weight, phi, psi)
        grad_x, grad_k = grouped_conv_backward(grad_z, x, kernels, geometry, need_x, need_w or need_phi or need_psi)
        grad_w = grad_phi = grad_psi = grad_gamma = None
        if grad_k is not None:
            flat = grad_k.flatten(3)  # B x C_out x C_in/g x kk
            if need_w:
                grad_w = torch.einsum("bock,bck->ock", flat, outer).view(weight.shape)
            if need_phi or need_psi:
                grad_outer = torch.einsum("bock,ock->bck", flat, weight.flatten(2))
                if need_phi and phi is not None:
                    grad_phi = (grad_outer * psi[:, None, :]).sum(-1)
                if need_psi:
                    grad_psi = (grad_outer * phi[:, :, None]).sum(1) if phi is not None else grad_outer.sum(1)
        if need_gamma and gamma is not None:
            grad_gamma = scale_grad(grad_y, y, gamma)
        return grad_x, grad_w, grad_phi, grad_psi, grad_gamma, None


# -------------------------------------------------------------------------------------------- loop
def _sample_kernel(weight: Tensor, phi: Optional[Tensor], psi: Tensor, b: int) -> Tensor:
    """W * (phi_b (x) psi_b) for one sample: C_out x C_in/g x kh x kw."""
    kh, kw = weight.shape[2], weight.shape[3]
    outer = psi[b].view(1, 1, kh, kw) if phi is None else (phi[b].view(-1, 1) * psi[b].view(1, -1)).view(1, -1, kh, kw)
    return mul_temporary(weight, outer, weight.shape)


def _loop_forward(x: Tensor, weight: Tensor, phi: Optional[Tensor], psi: Tensor, gamma: Optional[Tensor],
                  geometry: Geometry) -> Tensor:
    if x.shape[0] == 1:
        return folded_batch1(x, weight, gamma, phi, psi, geometry)
    stride, padding, dilation, groups = geometry
    outs = [F.conv2d(x[b : b + 1], _sample_kernel(weight, phi, psi, b), None, stride, padding, dilation, groups)
            for b in range(x.shape[0])]
    y = torch.cat(outs) if len(outs) > 1 else outs[0]
    return times_inplace(y, gamma.view(gamma.shape[0], gamma.shape[1], 1, 1)) if gamma is not None else y


class _LoopScaledConv(torch.autograd.Function):
    """``y_b = gamma_b * conv(x_b, W * (phi_b (x) psi_b))``, one dense conv per sample: a per-sample kernel
    exists for one sample at a time only (no B x C_out x C_in x k x k tensor)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, phi: Optional[Tensor], psi: Tensor, gamma: Optional[Tensor],
                geometry: Geometry) -> Tensor:
        y = _loop_forward(x, weight, phi, psi, gamma, geometry)
        ctx.geometry = geometry
        ctx.save_for_backward(x, weight, phi, psi, gamma, y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, weight, phi, psi, gamma, y = ctx.saved_tensors
        geometry = ctx.geometry
        groups = geometry[3]
        need_x, need_w, need_phi, need_psi, need_gamma = ctx.needs_input_grad[:5]
        grad_z = grad_y * gamma.view(*gamma.shape, 1, 1) if gamma is not None else grad_y
        need_k = need_w or need_phi or need_psi
        batch = x.shape[0]
        grad_xs: List[Tensor] = []
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_outer = []
        flat_w = weight.flatten(2)
        for b in range(batch):
            kernel = _sample_kernel(weight, phi, psi, b)
            gx, gk = conv_backward(grad_z[b : b + 1], x[b : b + 1], kernel, geometry, groups, need_x, need_k)
            if gx is not None:
                grad_xs.append(gx)
            if gk is not None:
                gk = gk.flatten(2)  # C_out x C_in/g x kk
                if grad_w is not None:
                    outer = (psi[b].view(1, 1, -1) if phi is None
                             else (phi[b].view(-1, 1) * psi[b].view(1, -1)).unsqueeze(0))
                    grad_w.view_as(gk).addcmul_(gk, outer)
                if need_phi or need_psi:
                    grad_outer.append((gk * flat_w).sum(0))
        grad_x = grad_phi = grad_psi = grad_gamma = None
        if grad_xs:
            grad_x = torch.cat(grad_xs) if len(grad_xs) > 1 else grad_xs[0]
        if grad_outer:
            go = torch.stack(grad_outer)  # B x C_in/g x kk
            if need_phi and phi is not None:
                grad_phi = (go * psi.unsqueeze(1)).sum(-1)
            if need_psi:
                grad_psi = (go * phi.unsqueeze(2)).sum(1) if phi is not None else go.sum(1)
        if need_gamma and gamma is not None:
            grad_gamma = scale_grad(grad_y, y, gamma)
        return grad_x, grad_w, grad_phi, grad_psi, grad_gamma, None


# -------------------------------------------------------------------------------------------- gemm
def _patch_scale(phi: Optional[Tensor], psi: Optional[Tensor], batch: int, groups: int, cin_g: int, kk: int,
                 like: Tensor) -> Tensor:
    """phi (x) psi per sample as B x g x (C_in/g * kk), in F.unfold's (channel, position) order."""
    if phi is not None and psi is not None:
        scale = phi.unsqueeze(2) * psi.unsqueeze(1)  # B x C_in/g x kk
    elif psi is not None:
        scale = psi.unsqueeze(1).expand(batch, cin_g, kk)
    elif phi is not None:
        scale = phi.unsqueeze(2).expand(batch, cin_g, kk)
    else:
        return like.new_ones(batch, groups, cin_g * kk)
    return scale.reshape(batch, 1, cin_g * kk).expand(batch, groups, cin_g * kk)


def _unfold(x: Tensor, kernel: Tuple[int, int], geometry: Geometry) -> Tensor:
    """F.unfold (B x C*kk x L); a free view for 1x1 kernels with stride 1 and no padding."""
    stride, padding, dilation, _ = geometry
    if kernel == (1, 1) and stride == (1, 1) and padding == (0, 0) and x.is_contiguous():
        return x.view(x.shape[0], x.shape[1], -1)
    return F.unfold(x, kernel, dilation, padding, stride)


def _scaled_patches(x: Tensor, scale: Tensor, kernel: Tuple[int, int], geometry: Geometry) -> Tuple[Tensor, Tensor]:
    """(raw patches B x C*kk x L from F.unfold, scaled patches laid out g x K x (B*L))."""
    groups = geometry[3]
    patches = _unfold(x, kernel, geometry)
    batch, rows, length = patches.shape
    k = rows // groups
    scaled = mul_to_contiguous(patches.view(batch, groups, k, length).permute(1, 2, 0, 3),
                                scale.permute(1, 2, 0).unsqueeze(-1), (groups, k, batch * length))
    return patches, scaled


# Channels-last form of the patch GEMM (groups == 1, batch > 1): the patch matrix is built as
# B*H_out*W_out rows of (kh*kw*C_in) from shifted windows of the padded NHWC input, so every copy and
# scaling runs over dense, contiguous channel vectors (the NCHW form needs permuted, short-strided
# copies). The output is a channels_last tensor (the NHWC GEMM result viewed as NCHW).
def _nhwc_padded(x: Tensor, phi: Optional[Tensor], geometry: Geometry) -> Tensor:
    """phi * x as B x (H+2p) x (W+2p) x C_in (zero border), in one pass when not compiling."""
    _, padding, _, _ = geometry
    ph, pw = padding
    batch, channels, height, width = x.shape
    nhwc = x.permute(0, 2, 3, 1)
    scale = phi.view(batch, 1, 1, channels) if phi is not None else None
    if torch.compiler.is_compiling() or not (ph or pw):
        u = nhwc * scale if scale is not None else nhwc
        return F.pad(u, (0, 0, pw, pw, ph, ph)) if (ph or pw) else u.contiguous()
    padded = x.new_zeros(batch, height + 2 * ph, width + 2 * pw, channels)
    inner = padded[:, ph : ph + height, pw : pw + width]
    if scale is not None:
        torch.mul(nhwc, scale, out=inner)
    else:
        inner.copy_(nhwc)
    return padded


def _nhwc_windows(padded: Tensor, kernel: Tuple[int, int], out_hw: Tuple[int, int], geometry: Geometry):
    """The kh*kw shifted (strided, dilated) windows of the padded NHWC input, each B x H_out x W_out x C."""
    stride, _, dilation, _ = geometry
    (sh, sw), (dh, dw), (ho, wo) = stride, dilation, out_hw
    return [padded[:, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
            for i in range(kernel[0]) for j in range(kernel[1])]


def _nhwc_patches(padded: Tensor, psi: Optional[Tensor], kernel: Tuple[int, int], out_hw: Tuple[int, int],
                  geometry: Geometry) -> Tensor:
    """B x H_out x W_out x kk x C patches, each window scaled by psi_b[j] (when given)."""
    batch, channels = padded.shape[0], padded.shape[-1]
    windows = _nhwc_windows(padded, kernel, out_hw, geometry)
    kk = len(windows)
    if torch.compiler.is_compiling():
        patches = torch.stack(windows, dim=3)
        return patches * psi.view(batch, 1, 1, kk, 1) if psi is not None else patches
    patches = padded.new_empty(batch, out_hw[0], out_hw[1], kk, channels)
    for j, window in enumerate(windows):
        if psi is not None:
            torch.mul(window, psi[:, j].view(batch, 1, 1, 1), out=patches[:, :, :, j])
        else:
            patches[:, :, :, j].copy_(window)
    return patches


def _nhwc_weight(weight: Tensor) -> Tensor:
    """C_out x (kh*kw*C_in): the weight in the NHWC patch order (kernel position major)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _gemm_nhwc_forward(x: Tensor, weight: Tensor, phi: Optional[Tensor], psi: Optional[Tensor],
                       gamma: Optional[Tensor], geometry: Geometry) -> Tensor:
    batch = x.shape[0]
    cout, _, kh, kw = weight.shape
    ho, wo = conv_out_hw(x.shape[2], x.shape[3], (kh, kw), geometry)
    patches = _nhwc_patches(_nhwc_padded(x, phi, geometry), psi, (kh, kw), (ho, wo), geometry)
    z = torch.mm(patches.view(batch * ho * wo, -1), _nhwc_weight(weight).t())  # B*L x C_out
    y = z.view(batch, ho, wo, cout)
    if gamma is not None:
        scale = gamma.view(batch, 1, 1, cout)
        y = times_inplace(y, scale)
    return y.permute(0, 3, 1, 2)


def _gemm_nhwc_backward(saved: Tuple[Optional[Tensor], ...], needs: Tuple[bool, ...], geometry: Geometry,
                        grad_y: Tensor):
    x, weight, phi, psi, gamma, y = saved
    assert x is not None and weight is not None and y is not None
    padding = geometry[1]
    need_x, need_w, need_phi, need_psi, need_gamma = needs[:5]
    batch, channels, height, width = x.shape
    cout, _, kh, kw = weight.shape
    ho, wo = grad_y.shape[-2:]
    grad_nhwc = grad_y.permute(0, 2, 3, 1)
    grad_z = (grad_nhwc * gamma.view(batch, 1, 1, cout) if gamma is not None else grad_nhwc).reshape(-1, cout)
    grad_x = grad_w = grad_phi = grad_psi = grad_gamma = None
    if need_gamma and gamma is not None:
        dot = (grad_nhwc * y.permute(0, 2, 3, 1)).sum(dim=(1, 2))
        grad_gamma = torch.where(gamma != 0, dot / torch.where(gamma != 0, gamma, torch.ones_like(gamma)),
                                 torch.zeros_like(dot))
    patches = None
    if need_w or need_psi:
        patches = _nhwc_patches(_nhwc_padded(x, phi, geometry), None, (kh, kw), (ho, wo), geometry)
    grad_patches = None
    if need_x or need_phi or need_psi:
        grad_patches = torch.mm(grad_z, _nhwc_weight(weight)).view(batch, ho, wo, kh * kw, channels)
        if need_psi and psi is not None:
            assert patches is not None
            grad_psi = (grad_patches * patches).sum(dim=(1, 2, 4))
    if need_w:
        assert patches is not None
        if psi is not None:
            patches = patches.mul_(psi.view(batch, 1, 1, kh * kw, 1))
        grad_w = torch.mm(grad_z.t(), patches.view(batch * ho * wo, -1))
        if kh * kw == 1:
            # already C_out x C_in: viewed, it has the weight's own strides. The permuted form of a 1x1 kernel counts
            # as contiguous, so .contiguous() would keep its channels_last strides, and DDP, whose gradient buckets
            # take the parameter's strides, would copy it every step with a "Grad strides do not match" warning
            grad_w = grad_w.view(weight.shape)
        else:
            grad_w = grad_w.view(cout, kh, kw, channels).permute(0, 3, 1, 2).contiguous()
    if need_x or need_phi:
        assert grad_patches is not None
        if psi is not None:
            grad_patches = grad_patches.mul_(psi.view(batch, 1, 1, kh * kw, 1))
        ph, pw = padding
        grad_padded = x.new_zeros(batch, height + 2 * ph, width + 2 * pw, channels)
        for j, window in enumerate(_nhwc_windows(grad_padded, (kh, kw), (ho, wo), geometry)):
            window.add_(grad_patches[:, :, :, j])
        grad_u = grad_padded[:, ph : ph + height, pw : pw + width]  # d/d(phi * x), NHWC
        if need_phi and phi is not None:
            grad_phi = (grad_u * x.permute(0, 2, 3, 1)).sum(dim=(1, 2))
        if need_x:
            grad_x = (grad_u * phi.view(batch, 1, 1, channels) if phi is not None else grad_u).permute(0, 3, 1, 2)
    return grad_x, grad_w, grad_phi, grad_psi, grad_gamma, None


def _gemm_forward(x: Tensor, weight: Tensor, phi: Optional[Tensor], psi: Optional[Tensor], gamma: Optional[Tensor],
                  geometry: Geometry) -> Tensor:
    groups = geometry[3]
    if groups == 1 and x.shape[0] > 1:
        return _gemm_nhwc_forward(x, weight, phi, psi, gamma, geometry)
    batch, _, height, width = x.shape
    cout, cin_g, kh, kw = weight.shape
    ho, wo = conv_out_hw(height, width, (kh, kw), geometry)
    length = ho * wo
    k = cin_g * kh * kw
    scale = _patch_scale(phi, psi, batch, groups, cin_g, kh * kw, x)
    w_g = weight.reshape(groups, cout // groups, k)
    if batch == 1 and groups == 1:
        return folded_batch1(x, weight, gamma, phi, psi, geometry, "gemm")
    if batch == 1:  # the patch matrix is already K x L: scale it and multiply, no re-layout
        patches = _unfold(x, (kh, kw), geometry).view(groups, k, length)
        z = torch.bmm(w_g, patches * scale.view(groups, k, 1))
        y = z.view(1, cout, ho, wo)
        return times_inplace(y, gamma.view(1, cout, 1, 1)) if gamma is not None else y
    _, scaled = _scaled_patches(x, scale, (kh, kw), geometry)
    z = torch.bmm(w_g, scaled)  # g x C_out/g x B*L
    z_nchw = z.view(cout, batch, length).permute(1, 0, 2)
    if gamma is not None:
        return mul_to_contiguous(z_nchw, gamma.unsqueeze(-1), (batch, cout, ho, wo))
    return z_nchw.contiguous().view(batch, cout, ho, wo)


class _PatchGemmScaledConv(torch.autograd.Function):
    """Single-GEMM patch path: ``y = gamma * (W_g @ U_g)`` with U the phi(x)psi-scaled patches of all samples."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, phi: Optional[Tensor], psi: Optional[Tensor],
                gamma: Optional[Tensor], geometry: Geometry) -> Tensor:
        y = _gemm_forward(x, weight, phi, psi, gamma, geometry)
        ctx.geometry = geometry
        ctx.save_for_backward(x, weight, phi, psi, gamma, y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, weight, phi, psi, gamma, y = ctx.saved_tensors
        geometry = ctx.geometry
        stride, padding, dilation, groups = geometry
        if groups == 1 and x.shape[0] > 1:
            return _gemm_nhwc_backward((x, weight, phi, psi, gamma, y), ctx.needs_input_grad, geometry, grad_y)
        need_x, need_w, need_phi, need_psi, need_gamma = ctx.needs_input_grad[:5]
        batch, channels, height, width = x.shape
        cout, cin_g, kh, kw = weight.shape
        k = cin_g * kh * kw
        length = grad_y.shape[-2] * grad_y.shape[-1]
        grad_cnl = grad_y.reshape(batch, cout, length).permute(1, 0, 2)
        if gamma is not None:
            grad_z = mul_to_contiguous(grad_cnl, gamma.t().unsqueeze(-1), (groups, cout // groups, batch * length))
        else:
            grad_z = grad_cnl.contiguous().view(groups, cout // groups, batch * length)
        w_g = weight.reshape(groups, cout // groups, k)
        scale = _patch_scale(phi, psi, batch, groups, cin_g, kh * kw, x)
        grad_x = grad_w = grad_phi = grad_psi = grad_gamma = None
        need_scale = need_phi or need_psi
        patches = scaled = None
        if need_w or need_scale:
            patches, scaled = _scaled_patches(x, scale, (kh, kw), geometry)
        if need_w:
            assert scaled is not None
            grad_w = torch.bmm(grad_z, scaled.transpose(1, 2)).view(weight.shape)
        if need_x or need_scale:
            grad_scaled = torch.bmm(w_g.transpose(1, 2), grad_z)  # g x K x B*L
            if need_scale:
                assert patches is not None
                raw = patches.view(batch, groups, k, length).permute(1, 2, 0, 3)
                grad_scale = (grad_scaled.view(groups, k, batch, length) * raw).sum(-1)  # g x K x B
                grad_scale = grad_scale.permute(2, 0, 1).reshape(batch, groups, cin_g, kh * kw).sum(1)
                if need_phi and phi is not None:
                    grad_phi = (grad_scale * psi[:, None, :]).sum(-1) if psi is not None else grad_scale.sum(-1)
                if need_psi and psi is not None:
                    grad_psi = (grad_scale * phi[:, :, None]).sum(1) if phi is not None else grad_scale.sum(1)
            if need_x:
                patches_grad = mul_to_contiguous(grad_scaled.view(groups, k, batch, length).permute(2, 0, 1, 3),
                                                  scale.unsqueeze(-1), (batch, channels * kh * kw, length))
                grad_x = F.fold(patches_grad, (height, width), (kh, kw), dilation, padding, stride)
        if need_gamma and gamma is not None:
            grad_gamma = scale_grad(grad_y, y, gamma)
        return grad_x, grad_w, grad_phi, grad_psi, grad_gamma, None




def scaled_conv(x: Tensor, weight: Tensor, gamma: Optional[Tensor], phi: Optional[Tensor], psi: Optional[Tensor],
                geometry: Geometry, engine: str) -> Tensor:
    """Rank-1 multiplicative PEDConv ``gamma * conv(phi * x, W * psi)`` (Eq. 3), lean in memory.

    ``gamma`` B x C_out, ``phi`` B x C_in/g, ``psi`` B x kh*kw, each None when the component is left out
    (fixed to 1). ``engine`` is one of :data:`ENGINES`; ``dense`` needs ``psi`` None or a 1x1 kernel.
    Without autograd (inference) the same forward runs without the Function's bookkeeping.
    """
    if engine not in ENGINES:
        raise ValueError(f"scaled_conv: unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    dtype = compute_dtype(x)
    if dtype is None:
        return _scaled_conv(x, weight, gamma, phi, psi, geometry, engine)
    with torch.autocast(x.device.type, enabled=False):
        return _scaled_conv(cast(x, dtype), cast(weight, dtype), cast(gamma, dtype), cast(phi, dtype),
                            cast(psi, dtype), geometry, engine)


def _scaled_conv(x: Tensor, weight: Tensor, gamma: Optional[Tensor], phi: Optional[Tensor], psi: Optional[Tensor],
                 geometry: Geometry, engine: str) -> Tensor:
    grad = needs_grad(x, weight, gamma, phi, psi)
    if engine == "dense" or (psi is None and engine == "grouped"):
        scale = gamma
        if psi is not None:
            if weight.shape[2] * weight.shape[3] != 1:
                raise ValueError("scaled_conv: engine 'dense' needs a 1x1 kernel or no psi")
            scale = psi if scale is None else scale * psi
        if phi is None and scale is None:
            stride, padding, dilation, groups = geometry
            return F.conv2d(x, weight, None, stride, padding, dilation, groups)
        if not grad:
            return _dense_forward(x, weight, phi, scale, geometry)
        return _DenseScaledConv.apply(x, weight, phi, scale, geometry)
    if engine == "grouped":
        assert psi is not None  # without psi, 'grouped' took the dense branch above
        if not grad:
            return _grouped_forward(x, weight, phi, psi, gamma, geometry)
        return _GroupedScaledConv.apply(x, weight, phi, psi, gamma, geometry)
    if engine == "loop":
        if psi is None:
            return _scaled_conv(x, weight, gamma, phi, psi, geometry, "dense")
        if not grad:
            return _loop_forward(x, weight, phi, psi, gamma, geometry)
        return _LoopScaledConv.apply(x, weight, phi, psi, gamma, geometry)
    if not grad:
        return _gemm_forward(x, weight, phi, psi, gamma, geometry)
    return _PatchGemmScaledConv.apply(x, weight, phi, psi, gamma, geometry)
