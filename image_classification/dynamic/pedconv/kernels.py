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
per-thread scratch buffer (:func:`_mul_temporary`) instead of fresh allocations: glibc hands a freed
multi-megabyte block back to the kernel, and the next call's fresh block then page-faults once per 4 KiB
page, which measured ~1,000 faults and ~1 ms per ResNet-18 layer at batch 1 (more than the layer's
whole arithmetic overhead).

Every kernel runs in the autocast dtype when autocast is on (inputs cast outside the Function, so
autograd casts the gradients back) and compiles with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import threading
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..functional import conv_output_size

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

#: (stride, padding, dilation, groups) with 2-tuples of ints, as nn.Conv2d holds them.
Geometry = Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int], int]
ENGINES = ("dense", "grouped", "loop", "gemm")


_SCRATCH = threading.local()
#: largest temporary (elements) the scratch buffer holds: 16 MiB of float32, above every ResNet/MobileNet weight
#: (ResNet-50's largest is 2.4M); larger ones (per-sample kernels of big batches) are allocated as usual, so a
#: validation pass never leaves a batch-sized buffer behind
SCRATCH_MAX_NUMEL = 1 << 22


def _scratch_pays(like: Tensor) -> bool:
    """Whether temporaries go to the scratch buffer: eager CPU code (not compiled, traced or exported)."""
    return like.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.jit.is_tracing()


def _scratch(shape: Sequence[int], like: Tensor) -> Tensor:
    """An uninitialised contiguous tensor of ``shape`` (``like``'s dtype) for a temporary that is consumed before
    the next call: a view of a per-thread CPU buffer reused by every call, up to :data:`SCRATCH_MAX_NUMEL`
    elements (eager CPU code only: see :func:`_scratch_pays`). The buffer and its views are made outside
    inference mode, so ``out=`` writes into them work in both inference mode and ``no_grad``."""
    shape = tuple(shape)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    views = buffers.get((like.dtype, shape))  # the view of every shape is made once per buffer
    if views is not None:
        return views
    numel = 1
    for size in shape:
        numel *= size
    if numel > SCRATCH_MAX_NUMEL:
        return like.new_empty(shape)
    flat = buffers.get(like.dtype)
    if flat is None or flat.numel() < numel:
        with torch.inference_mode(False):
            flat = torch.empty(numel, dtype=like.dtype)
        for key in [key for key in buffers if isinstance(key, tuple) and key[0] == like.dtype]:
            del buffers[key]  # views of the old buffer
        buffers[like.dtype] = flat
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    with torch.inference_mode(False):  # a view usable inside and outside inference mode
        view = buffers[(like.dtype, shape)] = flat.as_strided(shape, tuple(reversed(strides)))
    return view


def _times(y: Tensor, scale: Tensor) -> Tensor:
    """``y * scale`` into ``y``, a fresh output nothing else holds; out of place when compiled, where inductor fuses
    the product anyway and torch 2.11's inductor corrupts the heap on the in-place form inside an autograd.Function
    (the ``fold`` path's training forward)."""
    return y * scale if torch.compiler.is_compiling() else y.mul_(scale)


def _as_matrix(t: Tensor, shape: Tuple[int, int]) -> Tensor:
    """``t.reshape(shape)``; for a scratch temporary, the buffer's cached view of that shape (no dispatch)."""
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is not None and buffers.get((t.dtype, tuple(t.shape))) is t:
        return _scratch(shape, t)
    return t.reshape(shape)  # a view, or a copy of a channels_last weight


def _mul_temporary(a: Tensor, b: Tensor, shape: Sequence[int]) -> Tensor:
    """``a * b`` (broadcast to ``shape``, ``a``'s dtype) as a temporary: in the scratch buffer where it pays."""
    if not _scratch_pays(a):
        return a * b
    return torch.mul(a, b, out=_scratch(shape, a))


def _conv_backward(grad: Tensor, inp: Tensor, weight: Tensor, geometry: Geometry, groups: int,
                   need_input: bool, need_weight: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    stride, padding, dilation, _ = geometry
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, inp, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
        [need_input, need_weight, False],
    )
    return grad_input, grad_weight


def _expand_phi(phi: Tensor, groups: int) -> Tensor:
    """B x C_in/g -> B x C_in x 1 x 1 (phi scales the in-channels of every group alike)."""
    full = phi.repeat(1, groups) if groups > 1 else phi
    return full.view(full.shape[0], full.shape[1], 1, 1)


def _reduce_phi(grad_full: Tensor, groups: int) -> Tensor:
    """B x C_in gradient of the repeated phi -> B x C_in/g."""
    batch = grad_full.shape[0]
    return grad_full.view(batch, groups, -1).sum(1) if groups > 1 else grad_full


def _scale_grad(grad_out: Tensor, out: Tensor, scale: Tensor) -> Tensor:
    """d/d scale of ``out = scale[:, :, None, None] * z`` as ``sum_hw grad_out * out / scale`` (B x C_out)."""
    dot = (grad_out * out).sum(dim=(2, 3))
    return torch.where(scale != 0, dot / torch.where(scale != 0, scale, torch.ones_like(scale)), torch.zeros_like(dot))


def _mul_to_contiguous(a: Tensor, b: Tensor, shape: Tuple[int, ...]) -> Tensor:
    """``(a * b)`` as a new contiguous tensor viewed to ``shape``, in one pass.

    Eager: ``torch.mul(..., out=)`` writes the (permuted) product straight into a contiguous buffer.
    Compiled: ``out=`` is functionalised with the product's own strides, so ``contiguous()`` is used and
    inductor fuses the two into one kernel.
    """
    if torch.compiler.is_compiling():
        return (a * b).contiguous().view(shape)
    out = torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.result_type(a, b), device=a.device)
    torch.mul(a, b, out=out)
    return out.view(shape)


def _out_hw(height: int, width: int, kernel: Tuple[int, int], geometry: Geometry) -> Tuple[int, int]:
    stride, padding, dilation, _ = geometry
    return conv_output_size((height, width), kernel, stride, padding, dilation)


# ------------------------------------------------------------------------------------------- dense
def _dense_forward(x: Tensor, weight: Tensor, phi: Optional[Tensor], scale: Optional[Tensor],
                   geometry: Geometry) -> Tensor:
    """``s * conv(phi * x, W)``; at batch 1 phi and s go on the weight (:func:`weight_folded_conv`)."""
    stride, padding, dilation, groups = geometry
    if x.shape[0] == 1:
        return weight_folded_conv(x, weight, None if scale is None else scale.view(-1, 1, 1, 1),
                                  None if phi is None else phi.view(-1, 1, 1), None, geometry)
    u = x * _expand_phi(phi, groups) if phi is not None else x
    y = F.conv2d(u, weight, None, stride, padding, dilation, groups)
    return _times(y, scale.view(scale.shape[0], scale.shape[1], 1, 1)) if scale is not None else y


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
        phi_full = _expand_phi(phi, groups) if phi is not None else None
        u = x * phi_full if (phi_full is not None and need_w) else x
        grad_u, grad_w = _conv_backward(grad_z, u, weight, geometry, groups, need_x or need_phi, need_w)
        grad_x = grad_phi = grad_s = None
        if need_x:
            grad_x = grad_u * phi_full if phi_full is not None else grad_u
        if need_phi and phi is not None:
            grad_phi = _reduce_phi((grad_u * x).sum(dim=(2, 3)), groups)
        if need_s and scale is not None:
            grad_s = _scale_grad(grad_y, y, scale)
        return grad_x, grad_w, grad_phi, grad_s, None


# ----------------------------------------------------------------------------------------- grouped
def _fold_kernels(weight: Tensor, phi: Optional[Tensor], psi: Tensor) -> Tuple[Tensor, Tensor]:
    """(W * (phi_b (x) psi_b) as B x C_out x C_in/g x kh x kw, the outer product B x C_in/g x kk)."""
    batch = psi.shape[0]
    outer = psi.unsqueeze(1) if phi is None else phi.unsqueeze(2) * psi.unsqueeze(1)
    kernels = _mul_temporary(weight.unsqueeze(0), outer.view(batch, 1, outer.shape[1], *weight.shape[2:]),
                             (batch, *weight.shape))
    return kernels, outer


def _grouped_conv(u: Tensor, kernels: Tensor, geometry: Geometry) -> Tensor:
    stride, padding, dilation, groups = geometry
    batch, channels, height, width = u.shape
    if batch == 1:
        return F.conv2d(u, kernels[0], None, stride, padding, dilation, groups)
    out = F.conv2d(u.reshape(1, batch * channels, height, width), kernels.reshape(-1, *kernels.shape[2:]), None,
                   stride, padding, dilation, batch * groups)
    return out.view(batch, kernels.shape[1], out.shape[-2], out.shape[-1])


def _grouped_conv_backward(grad: Tensor, u: Tensor, kernels: Tensor, geometry: Geometry, need_input: bool,
                           need_weight: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients of :func:`_grouped_conv` wrt u (B x C x H x W) and the per-sample kernels."""
    groups = geometry[3]
    batch, channels, height, width = u.shape
    if batch == 1:
        gu, gk = _conv_backward(grad, u, kernels[0], geometry, groups, need_input, need_weight)
        return gu, (gk.unsqueeze(0) if gk is not None else None)
    gu, gk = _conv_backward(grad.reshape(1, -1, grad.shape[-2], grad.shape[-1]),
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
        return _folded_batch1(x, weight, gamma, phi, psi, geometry)
    y = _grouped_conv(x, _fold_kernels(weight, phi, psi)[0], geometry)
    return _times(y, gamma.view(gamma.shape[0], gamma.shape[1], 1, 1)) if gamma is not None else y


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
        grad_x, grad_k = _grouped_conv_backward(grad_z, x, kernels, geometry, need_x, need_w or need_phi or need_psi)
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
            grad_gamma = _scale_grad(grad_y, y, gamma)
        return grad_x, grad_w, grad_phi, grad_psi, grad_gamma, None


# -------------------------------------------------------------------------------------------- loop
def _sample_kernel(weight: Tensor, phi: Optional[Tensor], psi: Tensor, b: int) -> Tensor:
    """W * (phi_b (x) psi_b) for one sample: C_out x C_in/g x kh x kw."""
    kh, kw = weight.shape[2], weight.shape[3]
    outer = psi[b].view(1, 1, kh, kw) if phi is None else (phi[b].view(-1, 1) * psi[b].view(1, -1)).view(1, -1, kh, kw)
    return _mul_temporary(weight, outer, weight.shape)


def _loop_forward(x: Tensor, weight: Tensor, phi: Optional[Tensor], psi: Tensor, gamma: Optional[Tensor],
                  geometry: Geometry) -> Tensor:
    if x.shape[0] == 1:
        return _folded_batch1(x, weight, gamma, phi, psi, geometry)
    stride, padding, dilation, groups = geometry
    outs = [F.conv2d(x[b : b + 1], _sample_kernel(weight, phi, psi, b), None, stride, padding, dilation, groups)
            for b in range(x.shape[0])]
    y = torch.cat(outs) if len(outs) > 1 else outs[0]
    return _times(y, gamma.view(gamma.shape[0], gamma.shape[1], 1, 1)) if gamma is not None else y


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
            gx, gk = _conv_backward(grad_z[b : b + 1], x[b : b + 1], kernel, geometry, groups, need_x, need_k)
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
            grad_gamma = _scale_grad(grad_y, y, gamma)
        return grad_x, grad_w, grad_phi, grad_psi, grad_gamma, None


# -------------------------------------------------------------------------------------------- gemm
def _patch_scale(phi: Optional[Tensor], psi: Optional[Tensor], batch: int, groups: int, cin_g: int, kk: int,
                 like: Tensor) -> Tensor:
    """phi (x) psi per sample as B x g x (C_in/g * kk), in F.unfold's (channel, position) order."""
    if phi is None and psi is None:
        return like.new_ones(batch, groups, cin_g * kk)
    if phi is None:
        scale = psi.unsqueeze(1).expand(batch, cin_g, kk)
    elif psi is None:
        scale = phi.unsqueeze(2).expand(batch, cin_g, kk)
    else:
        scale = phi.unsqueeze(2) * psi.unsqueeze(1)  # B x C_in/g x kk
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
    scaled = _mul_to_contiguous(patches.view(batch, groups, k, length).permute(1, 2, 0, 3),
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
    ho, wo = _out_hw(x.shape[2], x.shape[3], (kh, kw), geometry)
    patches = _nhwc_patches(_nhwc_padded(x, phi, geometry), psi, (kh, kw), (ho, wo), geometry)
    z = torch.mm(patches.view(batch * ho * wo, -1), _nhwc_weight(weight).t())  # B*L x C_out
    y = z.view(batch, ho, wo, cout)
    if gamma is not None:
        scale = gamma.view(batch, 1, 1, cout)
        y = _times(y, scale)
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
    ho, wo = _out_hw(height, width, (kh, kw), geometry)
    length = ho * wo
    k = cin_g * kh * kw
    scale = _patch_scale(phi, psi, batch, groups, cin_g, kh * kw, x)
    w_g = weight.reshape(groups, cout // groups, k)
    if batch == 1 and groups == 1:
        return _folded_batch1(x, weight, gamma, phi, psi, geometry, "gemm")
    if batch == 1:  # the patch matrix is already K x L: scale it and multiply, no re-layout
        patches = _unfold(x, (kh, kw), geometry).view(groups, k, length)
        z = torch.bmm(w_g, patches * scale.view(groups, k, 1))
        y = z.view(1, cout, ho, wo)
        return _times(y, gamma.view(1, cout, 1, 1)) if gamma is not None else y
    _, scaled = _scaled_patches(x, scale, (kh, kw), geometry)
    z = torch.bmm(w_g, scaled)  # g x C_out/g x B*L
    z_nchw = z.view(cout, batch, length).permute(1, 0, 2)
    if gamma is not None:
        return _mul_to_contiguous(z_nchw, gamma.unsqueeze(-1), (batch, cout, ho, wo))
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
            grad_z = _mul_to_contiguous(grad_cnl, gamma.t().unsqueeze(-1), (groups, cout // groups, batch * length))
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
                patches_grad = _mul_to_contiguous(grad_scaled.view(groups, k, batch, length).permute(2, 0, 1, 3),
                                                  scale.unsqueeze(-1), (batch, channels * kh * kw, length))
                grad_x = F.fold(patches_grad, (height, width), (kh, kw), dilation, padding, stride)
        if need_gamma and gamma is not None:
            grad_gamma = _scale_grad(grad_y, y, gamma)
        return grad_x, grad_w, grad_phi, grad_psi, grad_gamma, None


# ------------------------------------------------------------------------------------ materialized
def _materialized_kernels(weight: Tensor, gamma: Tensor, phi: Tensor, psi: Tensor, additive: bool) -> Tensor:
    """W * CP (or W + CP), CP = sum_r gamma_r (x) phi_r (x) psi_r: B x C_out x C_in/g x kh x kw."""
    batch, rank = gamma.shape[:2]
    if rank == 1 and not additive:  # two passes over the B x weight tensor, no separate CP tensor
        outer = (phi.view(batch, -1, 1) * psi.view(batch, 1, -1)).view(batch, 1, weight.shape[1], *weight.shape[2:])
        return _mul_temporary(weight.unsqueeze(0), gamma.view(batch, -1, 1, 1, 1), (batch, *weight.shape)).mul_(outer)
    cp = torch.einsum("bro,brc,brk->bock", gamma, phi, psi).reshape(batch, *weight.shape)
    return weight + cp if additive else weight * cp


def _pointwise(x: Tensor, weight: Tensor, geometry: Geometry) -> bool:
    """1x1 kernel, stride 1, no padding and NCHW-contiguous input: per-sample weights as a batched matmul."""
    stride, padding, _, _ = geometry
    return weight.shape[2:] == (1, 1) and stride == (1, 1) and padding == (0, 0) and x.is_contiguous()


def _materialized_apply(x: Tensor, kernels: Tensor, geometry: Geometry) -> Tensor:
    if not _pointwise(x, kernels[0], geometry):
        return _grouped_conv(x, kernels, geometry)
    groups = geometry[3]
    batch, channels, height, width = x.shape
    cout = kernels.shape[1]
    y = torch.bmm(kernels.reshape(batch * groups, cout // groups, channels // groups),
                  x.view(batch * groups, channels // groups, height * width))
    return y.view(batch, cout, height, width)


def _materialized_apply_backward(grad: Tensor, x: Tensor, kernels: Tensor, geometry: Geometry, need_x: bool,
                                 need_k: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    if not _pointwise(x, kernels[0], geometry):
        return _grouped_conv_backward(grad, x, kernels, geometry, need_x, need_k)
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
        return _folded_batch1(x, weight, gamma, phi, psi, geometry)
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


# ----------------------------------------------------------------------------------------- batch 1
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


def _folded_batch1(x: Tensor, weight: Tensor, gamma: Optional[Tensor], phi: Optional[Tensor], psi: Optional[Tensor],
                   geometry: Geometry, engine: str = "conv") -> Tensor:
    """:func:`weight_folded_conv` / :func:`gemm_batch1` from rank-1 factors laid out 1 x dim (or 1 x 1 x dim).

    Under ``torch.compile`` a groups-1 layer whose weight is larger than its patch matrix takes the GEMM
    with scaled patches whatever the path: the weight then stays a constant, which inductor's freezing
    pre-packs once, where a folded weight would be re-laid out on every call (ResNet-18's 256-channel
    14x14 layer, compiled with freezing: 2.0 ms against 3.3 ms; static 1.8 ms).
    """
    cout, cin_g, kh, kw = weight.shape
    out_hw = _out_hw(x.shape[2], x.shape[3], (kh, kw), geometry)
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
    on_weight = gamma is not None and gamma.dim() == 4
    if outer is None:
        return _mul_temporary(weight, gamma, weight.shape) if on_weight else weight
    kernel = _mul_temporary(weight, outer, weight.shape)
    return kernel.mul_(gamma) if on_weight else kernel


def _output_gamma(y: Tensor, gamma: Optional[Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """``y`` (1 x C_out x H x W) times gamma laid out against the output (C_out x 1 x 1), in place when eager,
    plus ``bias`` (C_out) when given and not already added (``gamma`` on the weight: the product added it)."""
    if gamma is None or gamma.dim() == 4:
        return y
    if bias is not None:
        return torch.addcmul(bias.view(-1, 1, 1), y, gamma)
    return y * gamma if torch.compiler.is_compiling() else y.mul_(gamma)  # _times inlined: batch-1 hot path


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
    ho, wo = _out_hw(x.shape[2], x.shape[3], (kh, kw), geometry)
    k, length = cin_g * kh * kw, ho * wo
    pointwise = _pointwise(x, weight, geometry)
    unfolded = None if pointwise else F.unfold(x, (kh, kw), geometry[2], geometry[1], geometry[0])
    outer = _outer(phi, psi)
    if outer is not None and cout > length:  # batch1_plan: phi (x) psi on the patches, gamma on the output
        # patches as 1 x C_in/g x kk x L (the input itself for 1x1), scaled into the scratch buffer
        patches = x if unfolded is None else unfolded.view(1, cin_g, kh * kw, length)
        scaled = _mul_temporary(patches, outer, patches.shape)
        y = torch.mm(weight.reshape(cout, k), _as_matrix(scaled, (k, length)))  # a copy for channels_last W
        if gamma is not None and gamma.dim() == 4:
            gamma = gamma.view(cout, 1, 1)
    else:
        patches = (x if unfolded is None else unfolded).view(k, length)
        kernel = _as_matrix(_scaled_weight(weight, outer, gamma), (cout, k))
        if bias is not None and (gamma is None or gamma.dim() == 4):
            return torch.addmm(bias.view(cout, 1), kernel, patches).view(1, cout, ho, wo)
        y = torch.mm(kernel, patches)
    if bias is not None and gamma is None:
        return y.add_(bias.view(cout, 1)).view(1, cout, ho, wo)
    return _output_gamma(y.view(1, cout, ho, wo), gamma, bias)


# ------------------------------------------------------------------------------------------ public
def compute_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype for ``x``'s device when autocast is on (and x is floating), else None."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _cast(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    return t if (t is None or dtype is None or t.dtype == dtype) else t.to(dtype)


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether the autograd Function is needed.

    A jit trace (TorchScript or the TorchScript-based ONNX exporter) never takes it: a Python autograd
    Function becomes an opaque PythonOp that neither ``torch.jit.save`` nor ONNX can serialize, while the
    plain forward is made of standard ops (and autograd still differentiates it, without the lean memory).
    """
    if torch.jit.is_tracing():
        return False
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
        return _scaled_conv(_cast(x, dtype), _cast(weight, dtype), _cast(gamma, dtype), _cast(phi, dtype),
                            _cast(psi, dtype), geometry, engine)


def _scaled_conv(x: Tensor, weight: Tensor, gamma: Optional[Tensor], phi: Optional[Tensor], psi: Optional[Tensor],
                 geometry: Geometry, engine: str) -> Tensor:
    grad = _needs_grad(x, weight, gamma, phi, psi)
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


def materialized_conv(x: Tensor, weight: Tensor, gamma: Tensor, phi: Tensor, psi: Tensor, geometry: Geometry,
                      additive: bool = False) -> Tensor:
    """``conv(x_b, W (*|+) sum_r gamma_r (x) phi_r (x) psi_r)`` (Eq. 2 / Appendix E), lean in memory.

    Factors are B x R x dim (ones for left-out components). Saves x and the factors only.
    """
    dtype = compute_dtype(x)
    if dtype is not None:
        with torch.autocast(x.device.type, enabled=False):
            return materialized_conv(_cast(x, dtype), _cast(weight, dtype), _cast(gamma, dtype), _cast(phi, dtype),
                                     _cast(psi, dtype), geometry, additive)
    if not _needs_grad(x, weight, gamma, phi, psi):
        return _materialized_forward(x, weight, gamma, phi, psi, geometry, additive)
    return _MaterializedConv.apply(x, weight, gamma, phi, psi, geometry, additive)


def saved_tensor_bytes(fn, *args, exclude: Tuple[Tensor, ...] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while running ``fn(*args)``.

    Storages of ``exclude`` (e.g. parameters, which live anyway) are not counted.
    """
    seen = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())
