"""DY-Conv (Chen et al. 2020): per-sample kernel aggregation == reference, temperature schedule, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from image_classification.dynamic import build_conv, conv_from_static, parse_spec, set_epoch
from image_classification.dynamic.peers.dyconv import DyConv2d


def reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    weights = module.dynamic_weight(x)
    biases = module.dynamic_bias(x)
    return torch.cat([
        F.conv2d(x[i : i + 1], weights[i], None if biases is None else biases[i], stride=module.stride,
                 padding=module.padding, dilation=module.dilation, groups=module.groups)
        for i in range(x.shape[0])
    ])


def assert_matches_reference(module: nn.Module, x: torch.Tensor, tol: float = 1e-5) -> None:
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fast, ref = module(x1), reference(module, x2)
    torch.testing.assert_close(fast, ref, rtol=tol, atol=tol)
    g = torch.randn_like(fast)
    params = list(module.parameters())
    for a, b in zip(torch.autograd.grad(fast, [x1, *params], g), torch.autograd.grad(ref, [x2, *params], g)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


GEOMETRIES = [
    (8, 8, 1, 1, 0, 1, 1, True),
    (8, 16, 3, 2, 1, 1, 1, False),
    (8, 8, 3, 1, 2, 2, 1, True),
    (8, 16, 3, 1, 1, 1, 2, True),
    (8, 8, 3, 1, 1, 1, 8, False),
    (8, 8, (1, 3), (1, 2), (0, 1), 1, 1, True),
]


@pytest.mark.parametrize("geom", GEOMETRIES, ids=[str(i) for i in range(len(GEOMETRIES))])
def test_fast_path_matches_reference(geom):
    cin, cout, k, s, p, d, g, bias = geom
    torch.manual_seed(0)
    m = DyConv2d(cin, cout, k, s, p, d, g, bias, temperature=2.0)
    static = nn.Conv2d(cin, cout, k, s, p, d, g, bias)
    for batch in (3, 1):
        x = torch.randn(batch, cin, 7, 6)
        assert m(x).shape == static(x).shape
        assert_matches_reference(m, x)


def test_attention_is_softmax_with_temperature():
    torch.manual_seed(0)
    m = DyConv2d(8, 8, 3, padding=1, k=5)
    x = torch.randn(4, 8, 5, 5)
    pi = m.attention(x)
    assert pi.shape == (4, 5)
    torch.testing.assert_close(pi.sum(1), torch.ones(4))
    logits = m.fc2(F.relu(m.fc1(x.mean((2, 3)))))
    torch.testing.assert_close(pi, torch.softmax(logits / 30.0, 1))
    assert m.hidden == 4 and DyConv2d(64, 64, 1).hidden == 16


def test_temperature_schedule_via_set_epoch():
    model = nn.Sequential(DyConv2d(8, 8, 3, padding=1), nn.ReLU(), DyConv2d(8, 8, 1, anneal_epochs=4))
    expected = {0: (30.0, 30.0), 1: (27.1, 22.75), 5: (15.5, 1.0), 10: (1.0, 1.0), 20: (1.0, 1.0)}
    for epoch, (t0, t1) in expected.items():
        set_epoch(model, epoch)
        assert float(model[0].temperature) == pytest.approx(t0)
        assert float(model[2].temperature) == pytest.approx(t1)
    fixed = DyConv2d(8, 8, 1, temperature=5.0, anneal_epochs=0)
    fixed.set_epoch(7)
    assert float(fixed.temperature) == 5.0
    # the temperature travels with the state_dict, so a trained model evaluates at tau = 1
    fresh = DyConv2d(8, 8, 3, padding=1)
    fresh.load_state_dict(model[0].state_dict())
    assert float(fresh.temperature) == pytest.approx(1.0)


def test_eval_deterministic_and_per_sample_independent():
    torch.manual_seed(0)
    m = DyConv2d(8, 8, 3, padding=1, temperature=1.0).eval()
    x = torch.randn(4, 8, 6, 6)
    with torch.no_grad():
        y = m(x)
        torch.testing.assert_close(y, m(x), rtol=0, atol=0)
        torch.testing.assert_close(y[1:2], m(x[1:2]), rtol=1e-5, atol=1e-5)


def test_static_weight_copied_into_every_kernel_gives_the_static_conv():
    torch.manual_seed(0)
    static = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
    m = conv_from_static("dyconv:k=3", static)
    for k in range(3):
        torch.testing.assert_close(m.weight[k], static.weight)
        torch.testing.assert_close(m.bias[k], static.bias)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(m(x), static(x), rtol=1e-5, atol=1e-5)  # softmax sums to one
    with pytest.raises(ValueError, match="static weight shape"):
        m.load_static_weight(torch.zeros(16, 8, 3, 3))


def test_bad_arguments():
    with pytest.raises(ValueError, match="option 'k' of operator 'dyconv' must be >= 1"):
        DyConv2d(8, 8, 3, k=0)
    with pytest.raises(ValueError, match=">= 1"):
        parse_spec("dyconv:k=0")
    with pytest.raises(ValueError, match="divisible by groups"):
        DyConv2d(9, 8, 3, groups=2)
    with pytest.raises(ValueError, match="valid options: anneal_epochs, k, min_hidden, reduction, temperature"):
        build_conv("dyconv:experts=3", 8, 8, 3)
    with pytest.raises(ValueError, match="bad value"):
        parse_spec("dyconv:k=four")
