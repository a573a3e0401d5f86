"""CondConv (Yang et al. 2019): sigmoid routing over K experts, aggregated once per sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from image_classification.dynamic import build_conv, conv_from_static, parse_spec
from image_classification.dynamic.condconv import CondConv2d


def reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Report Eq. 5 literally: sum_k r_k(x) (W_k * x), one sample at a time."""
    pi = torch.sigmoid(module.routing(x.mean((2, 3))))
    outs = []
    for i in range(x.shape[0]):
        y = 0
        for k in range(module.num_kernels):
            bias = None if module.bias is None else module.bias[k]
            y = y + pi[i, k] * F.conv2d(x[i : i + 1], module.weight[k], bias, stride=module.stride,
                                        padding=module.padding, dilation=module.dilation, groups=module.groups)
        outs.append(y)
    return torch.cat(outs)


@pytest.mark.parametrize("geom", [
    (8, 8, 1, 1, 0, 1, 1, True),
    (8, 16, 3, 2, 1, 1, 1, False),
    (8, 8, 3, 1, 2, 2, 4, True),
    (8, 8, 3, 1, 1, 1, 8, True),
], ids=["1x1", "strided", "dilated-grouped", "depthwise"])
def test_matches_equation_forward_and_backward(geom):
    cin, cout, k, s, p, d, g, bias = geom
    torch.manual_seed(0)
    m = CondConv2d(cin, cout, k, s, p, d, g, bias, k=3)
    for batch in (3, 1):
        x1 = torch.randn(batch, cin, 6, 7, requires_grad=True)
        x2 = x1.detach().clone().requires_grad_(True)
        fast, ref = m(x1), reference(m, x2)
        assert fast.shape == nn.Conv2d(cin, cout, k, s, p, d, g)(x1).shape
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
        gout = torch.randn_like(fast)
        params = list(m.parameters())
        for a, b in zip(torch.autograd.grad(fast, [x1, *params], gout), torch.autograd.grad(ref, [x2, *params], gout)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # and the dynamic_weight/dynamic_bias export agrees
        w, b = m.dynamic_weight(x1), m.dynamic_bias(x1)
        per = torch.cat([F.conv2d(x1[i : i + 1], w[i], None if b is None else b[i], stride=m.stride, padding=m.padding,
                                  dilation=m.dilation, groups=m.groups) for i in range(batch)])
        torch.testing.assert_close(per, fast, rtol=1e-5, atol=1e-5)


def test_defaults_and_parameter_count():
    m = build_conv("condconv", 16, 32, 3, padding=1, bias=False)
    assert m.num_kernels == 8
    assert sum(p.numel() for p in m.parameters()) == 8 * 32 * 16 * 9 + 16 * 8 + 8
    pi = m.attention(torch.randn(2, 16, 4, 4))
    assert pi.shape == (2, 8) and bool(((pi > 0) & (pi < 1)).all())


def test_gradcheck_float64():
    torch.manual_seed(0)
    m = CondConv2d(4, 4, 3, padding=1, k=2).double()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_eval_per_sample_independent_and_state_dict():
    torch.manual_seed(0)
    m = CondConv2d(8, 8, 3, padding=1).eval()
    x = torch.randn(3, 8, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[2:], m(x[2:]), rtol=1e-5, atol=1e-5)
        n = CondConv2d(8, 8, 3, padding=1).eval()
        n.load_state_dict(m.state_dict())
        torch.testing.assert_close(n(x), m(x), rtol=0, atol=0)


def test_static_seed_copies_every_expert():
    static = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    m = conv_from_static("condconv:k=4", static)
    assert m.bias is None
    for k in range(4):
        torch.testing.assert_close(m.weight[k], static.weight)
    x = torch.randn(2, 8, 5, 5)
    scale = m.attention(x).sum(1)
    torch.testing.assert_close(m(x), static(x) * scale[:, None, None, None], rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        CondConv2d(8, 8, 3, k=0)
    with pytest.raises(ValueError, match="must be >= 1"):
        parse_spec("condconv:k=-1")
    with pytest.raises(ValueError, match="divisible by groups"):
        CondConv2d(8, 6, 3, groups=4)
    with pytest.raises(ValueError, match="valid options: k"):
        parse_spec("condconv:temperature=3")
