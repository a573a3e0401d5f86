"""Involution (Li et al. 2021, report Eq. 2-4): unfold fast path == explicit loops in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from image_classification.dynamic import build_conv, parse_spec
from image_classification.dynamic.peers.involution import Involution2d


def loop_reference(m: Involution2d, x: torch.Tensor) -> torch.Tensor:
    """Eq. 4 with explicit loops: Y[c, i] = sum_p H_{g(c), i}[p] X[c, i*s + p*d - pad]."""
    h = m.kernels(x)
    b, c = x.shape[:2]
    kh, kw = m.kernel_size
    (sh, sw), (ph, pw), (dh, dw) = m.stride, m.padding, m.dilation
    xp = F.pad(x, (pw, pw, ph, ph))
    oh, ow = h.shape[-2:]
    y = x.new_zeros(b, c, oh, ow)
    for ch in range(c):
        g = ch // m.group_channels
        for i in range(oh):
            for j in range(ow):
                acc = 0
                for u in range(kh):
                    for v in range(kw):
                        acc = acc + h[:, g, u * kw + v, i, j] * xp[:, ch, i * sh + u * dh, j * sw + v * dw]
                y[:, ch, i, j] = acc
    if m.proj is not None:
        return m.proj(y)
    return y if m.bias is None else y + m.bias[:, None, None]


@pytest.mark.parametrize("geom", [
    (4, 4, 3, 1, 1, 1, 1, False),
    (4, 4, 3, 2, 1, 1, 1, True),
    (4, 4, 3, 1, 2, 2, 4, False),
    (4, 8, 3, 2, 0, 1, 2, True),
    (4, 4, (3, 1), (1, 2), (1, 0), 1, 1, False),
], ids=["same", "strided-bias", "dilated-depthwise", "projection", "rect"])
def test_unfold_matches_explicit_loops_float64(geom):
    cin, cout, k, s, p, d, g, bias = geom
    torch.manual_seed(0)
    m = Involution2d(cin, cout, k, s, p, d, g, bias, group_channels=2, reduction=2).double().eval()
    x = torch.randn(2, cin, 5, 6, dtype=torch.float64)
    y = m(x)
    assert y.shape == nn.Conv2d(cin, cout, k, s, p, d, g).double()(x).shape
    torch.testing.assert_close(y, loop_reference(m, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("size", [(8, 6), (7, 5)], ids=["even", "odd"])
def test_kernel_context_is_the_input_averaged_to_the_output_size(size):
    """Strided: the generating map is the input average-pooled to the output grid (RedNet's AvgPool2d(stride)
    when the sizes divide, which the TorchScript-based exporter needs; adaptive pooling otherwise)."""
    torch.manual_seed(0)
    m = Involution2d(4, 4, 3, 2, 1, bias=False, group_channels=2, reduction=2).double().eval()
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    out_hw = m.output_size(*size)
    ctx = F.adaptive_avg_pool2d(x, out_hw)
    want = m.span(F.relu(m.bn(m.reduce(ctx)))).reshape(2, m.num_groups, 9, *out_hw)
    torch.testing.assert_close(m.kernels(x), want, rtol=1e-12, atol=1e-12)


def test_backward_matches_reference_float32():
    torch.manual_seed(0)
    m = Involution2d(4, 4, 3, 2, 1, group_channels=2, reduction=2).eval()
    x1 = torch.randn(2, 4, 5, 5, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    fast, ref = m(x1), loop_reference(m, x2)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(fast)
    params = list(m.parameters())
    for a, b in zip(torch.autograd.grad(fast, [x1, *params], g), torch.autograd.grad(ref, [x2, *params], g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_defaults_kernel_shape_and_parameter_count():
    m = build_conv("involution", 64, 64, 3, padding=1, bias=False)
    assert (m.group_channels, m.num_groups, m.reduction, m.proj) == (16, 4, 4, None)
    x = torch.randn(2, 64, 8, 8)
    assert m.kernels(x).shape == (2, 4, 9, 8, 8)
    mid = 16
    assert sum(p.numel() for p in m.parameters()) == 64 * mid + 2 * mid + mid * 9 * 4 + 9 * 4
    strided = build_conv("involution", 64, 128, 3, stride=2, padding=1)
    assert strided.kernels(x).shape == (2, 4, 9, 4, 4)
    assert strided(x).shape == (2, 128, 4, 4)


def test_eval_per_sample_independent_and_state_dict():
    torch.manual_seed(0)
    m = Involution2d(8, 8, 3, 1, 1, group_channels=4)
    m(torch.randn(4, 8, 5, 5))  # update BN running stats
    m.eval()
    x = torch.randn(3, 8, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[1:2], m(x[1:2]), rtol=1e-5, atol=1e-5)
        n = Involution2d(8, 8, 3, 1, 1, group_channels=4).eval()
        n.load_state_dict(m.state_dict())
        torch.testing.assert_close(n(x), m(x), rtol=0, atol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"in_channels \(24\) must be divisible by group_channels \(16\)"):
        Involution2d(24, 24, 3, padding=1)
    with pytest.raises(ValueError, match="divisible by groups"):
        Involution2d(16, 12, 3, groups=8)
    with pytest.raises(ValueError, match="valid options: group_channels, reduction"):
        parse_spec("involution:k=3")
    with pytest.raises(ValueError, match="must be >= 1"):
        parse_spec("involution:reduction=0")
