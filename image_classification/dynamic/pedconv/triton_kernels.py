"""Triton kernels of the fused rank-1 PEDConv convolution (see :mod:`.triton` for the API).

PEDConv, BMVC 2021, Eq. 2 with ``W_b = W_base * (gamma_b o phi_b o psi_b)`` and the algebra
``conv(x_b, W_b) = gamma_b * conv(phi_b * x_b, W_base * psi_b)``. Every kernel is an implicit GEMM
that scales the operand tiles it loads by the per-sample factors on the fly, so neither a per-sample
weight nor a per-sample weight gradient ever exists in memory. Accumulation is float32; the dot
operands are rounded to the input dtype (fp16/bf16/fp32), as a cuDNN convolution's operands are.

Shapes: x ``B x C x H x W``, W_base ``CO x C x KH x KW`` (groups = 1), gamma ``B x CO``, phi ``B x C``,
psi ``B x KH*KW`` (all three contiguous), y ``B x CO x HO x WO``. Tensors are addressed by their strides,
so NCHW and channels_last work alike (channels_last is the coalesced layout on a GPU). T = KH*KW taps.

This module imports triton at import time and decorates with ``triton.jit`` then, so whether the
kernels run compiled or in Triton's interpreter (``TRITON_INTERPRET=1``) is fixed when it is first
imported; :mod:`.triton` imports it lazily.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "pedconv_fwd_kernel",
    "pedconv_bwd_input_kernel",
    "pedconv_bwd_weight_kernel",
    "pedconv_grad_gamma_kernel",
    "loop_bound_probe_kernel",
]


@triton.jit
def loop_bound_probe_kernel(out_ptr, N, BLOCK: tl.constexpr):
    """out[0] = cdiv(N, BLOCK), counted by a loop whose bound is a runtime value, as the kernels below loop.

    Run once in Triton's interpreter (:func:`.triton.unavailable_reason`): the interpreter of Triton 3.2 (torch
    2.6's) turns such a bound into a Python int through numpy, which numpy 2.4 refuses (``TypeError``)."""
    count = 0
    for _ in range(0, tl.cdiv(N, BLOCK)):
        count += 1
    tl.store(out_ptr, count)


@triton.jit
def pedconv_fwd_kernel(
    x_ptr, w_ptr, gamma_ptr, phi_ptr, psi_ptr, y_ptr, z_ptr,
    B, C, H, W, CO, HO, WO,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wc, stride_wh, stride_ww,
    stride_yb, stride_yc, stride_yh, stride_yw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    HAS_GAMMA: tl.constexpr, HAS_PHI: tl.constexpr, HAS_PSI: tl.constexpr, STORE_Z: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[b,o,p] = gamma[b,o] * sum_{c,t} W[o,c,t] * (phi[b,c] * psi[b,t] * x[b,c,p*S-P+t*D]).

    GEMM view: M = B*HO*WO output pixels, N = CO output channels, K = T*C. One program owns a
    BLOCK_M x BLOCK_N tile of y; one flat loop runs over (tap, BLOCK_K channel block) pairs, loads
    the x tile at the tap's shifted positions (zero outside the image), multiplies it by
    phi[b,c]*psi[b,t] in float32, rounds it to the dot dtype and accumulates ``x_tile @ W_tile``.
    Epilogue: optionally stores z = acc (the pre-gamma output that grad-gamma needs), then y = gamma*acc.
    """
    pid = tl.program_id(0)
    hw_out = HO * WO
    M = B * hw_out
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(CO, BLOCK_N)
    group_span = GROUP_M * num_pid_n
    first_m = (pid // group_span) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_span) % group_rows
    pid_n = (pid % group_span) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    b = offs_m // hw_out
    rem = offs_m % hw_out
    oh = rem // WO
    ow = rem % WO
    b64 = b.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < CO
    dot_ty = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_blocks = tl.cdiv(C, BLOCK_K)
    # one flat (tap, channel block) loop: a single software-pipelined loop, as in a dense conv kernel
    for step in range(0, KH * KW * k_blocks):
        tap = step // k_blocks
        offs_k = (step % k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < C
        kh = tap // KW
        kw = tap % KW
        ih = oh * SH - PH + kh * DH
        iw = ow * SW - PW + kw * DW
        valid = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_ptr + (b64 * stride_xb + ih * stride_xh + iw * stride_xw)[:, None] + offs_k[None, :] * stride_xc,
                    mask=valid[:, None] & k_mask[None, :], other=0.0)
        if HAS_PHI or HAS_PSI:
            a = a.to(tl.float32)
            if HAS_PHI:
                phi = tl.load(phi_ptr + b[:, None] * C + offs_k[None, :],
                              mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                a = a * phi.to(tl.float32)
            if HAS_PSI:
                psi_t = tl.load(psi_ptr + b * (KH * KW) + tap, mask=m_mask, other=0.0)
                a = a * psi_t.to(tl.float32)[:, None]
            a = a.to(dot_ty)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wo + offs_k[:, None] * stride_wc
                    + (kh * stride_wh + kw * stride_ww),
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:  # exact fp32 products of the rounded operands (interpreter bf16)
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)

    out_mask = m_mask[:, None] & n_mask[None, :]
    out_offs = (b64 * stride_yb + oh * stride_yh + ow * stride_yw)[:, None] + offs_n[None, :] * stride_yc
    if STORE_Z:
        tl.store(z_ptr + out_offs, acc.to(z_ptr.dtype.element_ty), mask=out_mask)
    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr + b[:, None] * CO + offs_n[None, :], mask=out_mask, other=0.0)
        acc = acc * gamma.to(tl.float32)
    tl.store(y_ptr + out_offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def pedconv_bwd_input_kernel(
    gy_ptr, w_ptr, x_ptr, gamma_ptr, phi_ptr, psi_ptr, gx_ptr, gphi_ptr, gpsi_ptr,
    B, C, H, W, CO, HO, WO, HQ, WQ,
    stride_gb, stride_go, stride_gh, stride_gw,
    stride_wo, stride_wc, stride_wh, stride_ww,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_gxb, stride_gxc, stride_gxh, stride_gxw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    HAS_GAMMA: tl.constexpr, HAS_PHI: tl.constexpr, HAS_PSI: tl.constexpr,
    STORE_GX: tl.constexpr, NEED_GPHI: tl.constexpr, NEED_GPSI: tl.constexpr, TAPS_P2: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """grad-x, grad-phi and grad-psi from one transposed implicit GEMM.

    With gz = gamma * gy and u = phi * x, the gradient of u is
    ``gu[b,c,q] = sum_t psi[b,t] * D_t[b,c,q]``, ``D_t[b,c,q] = sum_o W[o,c,t] * gz[b,o,(q+P-t*D)/S]``
    (only where that output position is an integer inside the output). Then
    ``gx = phi * gu``, ``gphi[b,c] = sum_q x * gu`` and ``gpsi[b,t] = sum_{c,q} u * D_t``.

    GEMM view: M = input pixels, N = C, K = CO*T. Strided convolutions are split into SH*SW
    sub-pixel classes (grid axis 1, class r = (q + P) mod S): inside a class exactly the taps with
    t*D = r (mod S) reach an output pixel, so no masked-out multiply is issued for the other taps.
    A program computes D_t for each tap (loop over CO in BLOCK_K steps, gy tile scaled by gamma on
    load), adds psi*D_t to its accumulator and, for gpsi, keeps the row sums of u*D_t per tap. The
    epilogue reduces those (gpsi) and x*gu (gphi) over the rows of each sample in the tile (one
    sample, or a few for small maps) and adds them to float32 buffers with atomic adds, since the
    other tiles of the same sample contribute too.
    """
    pid = tl.program_id(0)
    sub = tl.program_id(1)
    rh = sub // SW
    rw = sub % SW
    ih0 = ((rh - PH) % SH + SH) % SH  # first input row of class rh: (ih + PH) % SH == rh
    iw0 = ((rw - PW) % SW + SW) % SW
    hw_q = HQ * WQ
    M = B * hw_q
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(C, BLOCK_N)
    group_span = GROUP_M * num_pid_n
    first_m = (pid // group_span) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_span) % group_rows
    pid_n = (pid % group_span) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    b = offs_m // hw_q
    rem = offs_m % hw_q
    ih = ih0 + (rem // WQ) * SH
    iw = iw0 + (rem % WQ) * SW
    row_mask = (offs_m < M) & (ih < H) & (iw < W)
    b64 = b.to(tl.int64)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = offs_c < C
    tile_mask = row_mask[:, None] & c_mask[None, :]
    dot_ty = gy_ptr.dtype.element_ty
    b_first = (pid_m * BLOCK_M) // hw_q
    b_last = tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, M - 1) // hw_q

    x_offs = (b64 * stride_xb + ih * stride_xh + iw * stride_xw)[:, None] + offs_c[None, :] * stride_xc
    phi_offs = b[:, None] * C + offs_c[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    taps = tl.arange(0, TAPS_P2)
    tap_dots = tl.zeros((BLOCK_M, TAPS_P2), dtype=tl.float32)  # per row, per tap: sum_c u * D_t (grad-psi)
    for tap in range(0, KH * KW):
        kh = tap // KW
        kw = tap % KW
        if ((kh * DH) % SH == rh) & ((kw * DW) % SW == rw):  # the taps that reach this sub-pixel class
            oh = (ih + PH - kh * DH) // SH  # exact: the numerator is a multiple of SH in this class
            ow = (iw + PW - kw * DW) // SW
            valid = row_mask & (oh >= 0) & (oh < HO) & (ow >= 0) & (ow < WO)
            gy_rows = b64 * stride_gb + oh * stride_gh + ow * stride_gw
            d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for o0 in range(0, CO, BLOCK_K):
                offs_o = o0 + tl.arange(0, BLOCK_K)
                o_mask = offs_o < CO
                a = tl.load(gy_ptr + gy_rows[:, None] + offs_o[None, :] * stride_go,
                            mask=valid[:, None] & o_mask[None, :], other=0.0)
                if HAS_GAMMA:
                    gamma = tl.load(gamma_ptr + b[:, None] * CO + offs_o[None, :],
                                    mask=row_mask[:, None] & o_mask[None, :], other=0.0)
                    a = (a.to(tl.float32) * gamma.to(tl.float32)).to(dot_ty)
                w = tl.load(w_ptr + offs_o[:, None] * stride_wo + offs_c[None, :] * stride_wc
                            + (kh * stride_wh + kw * stride_ww),
                            mask=o_mask[:, None] & c_mask[None, :], other=0.0)
                if DOT_FP32:
                    a = a.to(tl.float32)
                    w = w.to(tl.float32)
                d = tl.dot(a, w, d, input_precision=INPUT_PRECISION)
            if HAS_PSI:
                psi_t = tl.load(psi_ptr + b * (KH * KW) + tap, mask=row_mask, other=0.0).to(tl.float32)
                acc += psi_t[:, None] * d
            else:
                acc += d
            if NEED_GPSI:
                # u = phi * x is reloaded per tap (L1/L2 hits) rather than held in registers
                u = tl.load(x_ptr + x_offs, mask=tile_mask, other=0.0).to(tl.float32)
                if HAS_PHI:
                    u = u * tl.load(phi_ptr + phi_offs, mask=tile_mask, other=0.0).to(tl.float32)
                row_dot = tl.sum(u * d, axis=1)
                tap_dots += tl.where(taps[None, :] == tap, row_dot[:, None], 0.0)

    if STORE_GX:
        gx = acc
        if HAS_PHI:
            gx = acc * tl.load(phi_ptr + phi_offs, mask=tile_mask, other=0.0).to(tl.float32)
        tl.store(gx_ptr + (b64 * stride_gxb + ih * stride_gxh + iw * stride_gxw)[:, None]
                 + offs_c[None, :] * stride_gxc, gx.to(gx_ptr.dtype.element_ty), mask=tile_mask)
    if NEED_GPSI:
        for s in range(b_first, b_last + 1):
            part = tl.sum(tl.where((b == s)[:, None], tap_dots, 0.0), axis=0)
            tl.atomic_add(gpsi_ptr + s * (KH * KW) + taps, part, mask=taps < KH * KW)
    if NEED_GPHI:
        prod = tl.load(x_ptr + x_offs, mask=tile_mask, other=0.0).to(tl.float32) * acc
        for s in range(b_first, b_last + 1):
            part = tl.sum(tl.where((b == s)[:, None], prod, 0.0), axis=0)
            tl.atomic_add(gphi_ptr + s * C + offs_c, part, mask=c_mask)


@triton.jit
def pedconv_bwd_weight_kernel(
    gy_ptr, x_ptr, gamma_ptr, phi_ptr, psi_ptr, gw_ptr,
    B, C, H, W, CO, HO, WO,
    stride_gb, stride_go, stride_gh, stride_gw,
    stride_xb, stride_xc, stride_xh, stride_xw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    HAS_GAMMA: tl.constexpr, HAS_PHI: tl.constexpr, HAS_PSI: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """grad-W_base[o,c,t] = sum_{b,p} (gamma[b,o]*gy[b,o,p]) * (phi[b,c]*psi[b,t]*x[b,c,p*S-P+t*D]).

    GEMM view per tap t (grid axis 1): M = CO, N = C, K = B*HO*WO pixels of the whole batch, with both
    operand tiles scaled on load (gy by gamma, x by phi*psi), so the per-sample weight gradient is
    never formed. Grid axis 2 splits K into equal chunks (split-K) when CO x C x T tiles alone would
    not fill the GPU; every chunk atomically adds its float32 tile into ``gw`` (CO x KH x KW x C,
    float32, zeroed before the launch).
    """
    pid = tl.program_id(0)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    nsplit = tl.num_programs(2)
    kh = tap // KW
    kw = tap % KW
    num_pid_m = tl.cdiv(CO, BLOCK_M)
    num_pid_n = tl.cdiv(C, BLOCK_N)
    group_span = GROUP_M * num_pid_n
    first_m = (pid // group_span) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_span) % group_rows
    pid_n = (pid % group_span) // group_rows

    offs_o = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_mask = offs_o < CO
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = offs_c < C
    hw_out = HO * WO
    P = B * hw_out
    chunk = tl.cdiv(tl.cdiv(P, nsplit), BLOCK_K) * BLOCK_K
    k_start = split * chunk
    k_end = tl.minimum(k_start + chunk, P)
    dot_ty = gy_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        b = offs_k // hw_out
        rem = offs_k % hw_out
        oh = rem // WO
        ow = rem % WO
        b64 = b.to(tl.int64)
        a = tl.load(gy_ptr + offs_o[:, None] * stride_go + (b64 * stride_gb + oh * stride_gh + ow * stride_gw)[None, :],
                    mask=o_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_GAMMA:
            gamma = tl.load(gamma_ptr + b[None, :] * CO + offs_o[:, None],
                            mask=o_mask[:, None] & k_mask[None, :], other=0.0)
            a = (a.to(tl.float32) * gamma.to(tl.float32)).to(dot_ty)
        ih = oh * SH - PH + kh * DH
        iw = ow * SW - PW + kw * DW
        valid = k_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        v = tl.load(x_ptr + (b64 * stride_xb + ih * stride_xh + iw * stride_xw)[:, None] + offs_c[None, :] * stride_xc,
                    mask=valid[:, None] & c_mask[None, :], other=0.0)
        if HAS_PHI or HAS_PSI:
            v = v.to(tl.float32)
            if HAS_PHI:
                phi = tl.load(phi_ptr + b[:, None] * C + offs_c[None, :],
                              mask=k_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
                v = v * phi
            if HAS_PSI:
                psi_t = tl.load(psi_ptr + b * (KH * KW) + tap, mask=k_mask, other=0.0).to(tl.float32)
                v = v * psi_t[:, None]
            v = v.to(dot_ty)
        if DOT_FP32:
            a = a.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(a, v, acc, input_precision=INPUT_PRECISION)

    gw_offs = offs_o[:, None] * (KH * KW * C) + tap * C + offs_c[None, :]
    tl.atomic_add(gw_ptr + gw_offs, acc, mask=o_mask[:, None] & c_mask[None, :])


@triton.jit
def pedconv_grad_gamma_kernel(
    gy_ptr, z_ptr, out_ptr,
    CO, HO, WO,
    stride_gb, stride_go, stride_gh, stride_gw,
    stride_zb, stride_zo, stride_zh, stride_zw,
    BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """grad-gamma[b,o] = sum_p gy[b,o,p] * z[b,o,p] (z = the saved pre-gamma output), float32 sums.

    Grid: (B, cdiv(CO, BLOCK_O)); each program reduces its channels over all output pixels of one
    sample, so the result is deterministic (no atomics).
    """
    bid = tl.program_id(0).to(tl.int64)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = offs_o < CO
    hw_out = HO * WO
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for p0 in range(0, hw_out, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < hw_out
        oh = offs_p // WO
        ow = offs_p % WO
        mask = p_mask[:, None] & o_mask[None, :]
        g = tl.load(gy_ptr + bid * stride_gb + (oh * stride_gh + ow * stride_gw)[:, None] + offs_o[None, :] * stride_go,
                    mask=mask, other=0.0)
        z = tl.load(z_ptr + bid * stride_zb + (oh * stride_zh + ow * stride_zw)[:, None] + offs_o[None, :] * stride_zo,
                    mask=mask, other=0.0)
        acc += tl.sum(g.to(tl.float32) * z.to(tl.float32), axis=0)
    tl.store(out_ptr + bid * CO + offs_o, acc, mask=o_mask)
