"""CondConv (Yang et al. 2019): sigmoid routing over K experts, aggregated once per sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from image_classification.dynamic import build_conv, conv_from_static, parse_spec
from image_classification.dynamic.peers.condconv import CondConv2d


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
    with pytest.raises(ValueError, match="option 'k' of operator 'condconv' must be >= 1"):
        CondConv2d(8, 8, 3, k=0)
    with pytest.raises(ValueError, match="must be >= 1"):
        parse_spec("condconv:k=-1")
    with pytest.raises(ValueError, match="divisible by groups"):
        CondConv2d(8, 6, 3, groups=4)
    with pytest.raises(ValueError, match="valid options: k, routing"):
        parse_spec("condconv:temperature=3")


# ------------------------------------------------------------------------------------------------
# routing=block: one routing function per block, from the block input (the CondConv paper's
# EfficientNet; timm's CondConvResidual), shared by the block's expansion, depthwise and projection
# ------------------------------------------------------------------------------------------------
def _mixed(conv: nn.Module, r: torch.Tensor) -> torch.Tensor:
    """sum_k r_k W_k for one sample (the plain formula)."""
    return sum(r[k] * conv.weight[k] for k in range(conv.num_kernels))


def inverted_residual_reference(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's InvertedResidual (eval), every conv mixing its experts with r = sigmoid(FC(GAP(x_block)))."""
    fc = block.condconv_routing.fc
    outs = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        r = torch.sigmoid(fc.weight @ xi.mean((2, 3))[0] + fc.bias)
        h = xi
        for stage in block.conv:
            if isinstance(stage, nn.Sequential):  # Conv2dNormActivation: conv, BN, ReLU6
                conv, bn, act = stage
                h = act(bn(F.conv2d(h, _mixed(conv, r), stride=conv.stride, padding=conv.padding,
                                    groups=conv.groups)))
            elif isinstance(stage, CondConv2d):
                h = F.conv2d(h, _mixed(stage, r), stride=stage.stride, padding=stage.padding, groups=stage.groups)
            else:
                h = stage(h)
        outs.append(xi + h if block.use_res_connect else h)
    return torch.cat(outs)


def _mobilenet_v2(conv: str, placement: str) -> nn.Module:
    from image_classification.models import build_model

    return build_model("mobilenet_v2", conv, placement, num_classes=10, width_mult=0.35)


def test_block_routing_is_shared_and_equals_the_formula():
    torch.manual_seed(0)
    model = _mobilenet_v2("condconv:k=3,routing=block", "pointwise+depthwise+inblock").eval()
    block = model.features[3]  # expansion 6, stride 1, residual
    convs = [m for m in block.modules() if isinstance(m, CondConv2d)]
    assert len(convs) == 3 and all(c.routing is None for c in convs)
    assert block.condconv_routing.fc.in_features == block.conv[0][0].in_channels
    with torch.no_grad():
        for expert in convs:  # distinct experts, so a wrong mixing would show
            expert.weight.add_(torch.randn_like(expert.weight) * 0.2)
    x = torch.randn(3, block.conv[0][0].in_channels, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(block(x), inverted_residual_reference(block, x), rtol=1e-5, atol=1e-5)
    # the shared FC gets the gradient of all three convs; the convs' own routing FCs are gone
    block.train()
    block(x).square().sum().backward()
    assert block.condconv_routing.fc.weight.grad.abs().sum() > 0
    assert not any("conv.0.0.routing" in k for k in block.state_dict())


def test_block_routing_state_dict_deepcopy_and_lone_convs():
    import copy

    torch.manual_seed(0)
    a = _mobilenet_v2("condconv:k=2,routing=block", "deep+inblock")
    b = _mobilenet_v2("condconv:k=2,routing=block", "deep+inblock")
    x = torch.randn(2, 3, 32, 32)
    a(x).sum().backward()  # leaves the routing weights of a training forward on the convs
    ema = copy.deepcopy(a)  # AveragedModel deep-copies mid-training
    b.load_state_dict(a.state_dict())
    for m in (a, b, ema):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
        torch.testing.assert_close(ema(x), a(x), rtol=0, atol=0)
    # a conv outside any block (the classifier via +cls) keeps its own routing: its input is its own
    c = _mobilenet_v2("condconv:k=2,routing=block", "deep+inblock+cls")
    assert c.classifier[1].conv.routing is not None
    # a routed conv run alone (not through its block) is refused with one line
    conv = next(m for m in c.modules() if isinstance(m, CondConv2d) and m.routing is None)
    with pytest.raises(RuntimeError, match="run the enclosing block"):
        conv(torch.randn(2, conv.in_channels, 4, 4))
    with pytest.raises(ValueError, match="valid: conv, block"):
        parse_spec("condconv:routing=layer")
