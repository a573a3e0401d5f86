"""DCD (Li et al. 2021, Eq. 6-9): fast path == per-sample reference conv, gradients, geometry, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from image_classification.dynamic import build_conv, conv_from_static, parse_spec
from image_classification.dynamic.dcd import DCDConv2d, DCDLinear, default_latent


def reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-sample F.conv2d with the module's dynamic_weight (the plain reference formula)."""
    weights = module.dynamic_weight(x)
    outs = [
        F.conv2d(x[i : i + 1], weights[i], module.bias, stride=module.stride, padding=module.padding,
                 dilation=module.dilation, groups=module.groups)
        for i in range(x.shape[0])
    ]
    return torch.cat(outs)


def assert_matches_reference(module: nn.Module, x: torch.Tensor, tol: float = 1e-5) -> None:
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    fast = module(x1)
    ref = reference(module, x2)
    assert fast.shape == ref.shape
    torch.testing.assert_close(fast, ref, rtol=tol, atol=tol)
    g = torch.randn_like(fast)
    params = [p for p in module.parameters() if p.requires_grad]
    grads_fast = torch.autograd.grad(fast, [x1, *params], g, allow_unused=True)
    grads_ref = torch.autograd.grad(ref, [x2, *params], g, allow_unused=True)
    for a, b in zip(grads_fast, grads_ref):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


GEOMETRIES = [
    # in, out, k, stride, padding, dilation, groups, bias, options
    (16, 16, 1, 1, 0, 1, 1, False, {}),
    (16, 24, 1, 2, 0, 1, 1, True, {}),
    (16, 16, 3, 1, 1, 1, 1, True, {}),
    (16, 32, 3, 2, 1, 1, 1, False, {}),
    (16, 16, 3, 1, 2, 2, 1, True, {}),
    (16, 16, 3, 1, 0, 1, 1, False, {}),
    (16, 16, (3, 5), (2, 1), (1, 2), 1, 1, True, {}),
    (16, 32, 3, 1, 1, 1, 2, True, {}),
    (16, 16, 1, 1, 0, 1, 1, True, {"blocks": 2}),
    (16, 16, 3, 2, 1, 1, 2, False, {"blocks": 2}),
    (16, 16, 3, 1, 1, 1, 1, True, {"mode": "joint"}),
    (16, 24, 3, 2, 1, 2, 1, False, {"mode": "joint"}),
    (16, 16, 3, 1, 1, 1, 2, True, {"mode": "joint", "blocks": 2}),
    (16, 16, 3, 1, 1, 1, 16, True, {}),
    (8, 16, 3, 2, 1, 1, 8, False, {}),
    (16, 16, 5, 1, 2, 1, 16, True, {"latent_kernel": 3}),
    (16, 16, 1, 1, 0, 1, 1, True, {"components": ("phi",)}),
    (16, 16, 3, 1, 1, 1, 1, True, {"components": ("lambda",)}),
    (16, 16, 3, 1, 1, 1, 1, True, {"pool": 1, "latent": 3}),
]


@pytest.mark.parametrize("geom", GEOMETRIES, ids=[str(i) for i in range(len(GEOMETRIES))])
def test_fast_path_matches_reference(geom):
    cin, cout, k, s, p, d, g, bias, opts = geom
    torch.manual_seed(0)
    m = DCDConv2d(cin, cout, k, s, p, d, g, bias, **opts)
    static = nn.Conv2d(cin, cout, k, s, p, d, g, bias)
    for path in ("auto", "branch", "fold"):
        m.path = path
        for batch in (3, 1):
            x = torch.randn(batch, cin, 7, 6)
            assert m(x).shape == static(x).shape
            assert_matches_reference(m, x)


def test_centre_samples_view_and_padding():
    m = DCDConv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 6, 6)
    assert m._centre_samples(x, (6, 6)) is x  # 'same' padding, stride 1: the input itself
    m = DCDConv2d(4, 4, 3, padding=0)
    torch.testing.assert_close(m._centre_samples(x, (4, 4)), x[:, :, 1:5, 1:5])
    m = DCDConv2d(4, 4, 3, padding=3, dilation=1)
    c = m._centre_samples(x, (8, 8))
    assert c.shape == (1, 4, 8, 8) and float(c[:, :, 0].abs().sum()) == 0.0


def test_pooled_context_equals_adaptive_pooling():
    torch.manual_seed(0)
    m = DCDConv2d(4, 4, 3, padding=1)
    assert m.pool == 2
    for size in ((6, 8), (7, 5)):
        x = torch.randn(2, 4, *size)
        lam, phi = m.coefficients(x)
        ctx = F.adaptive_avg_pool2d(x, 2).reshape(2, -1)
        out = m.fc2(F.relu(m.fc1(ctx)))
        torch.testing.assert_close(lam, F.relu6(out[:, :4] + 3) / 3)
        torch.testing.assert_close(phi.reshape(2, -1), out[:, 4:])


def test_bad_path_is_reported():
    m = DCDConv2d(4, 4, 1)
    m.path = "fast"
    with pytest.raises(ValueError, match="path must be one of auto, branch, fold"):
        m(torch.randn(1, 4, 2, 2))


def test_forms_and_defaults():
    assert DCDConv2d(64, 64, 1).form == "channel"
    assert DCDConv2d(64, 64, 3, padding=1).form == "channel"
    assert DCDConv2d(64, 64, 3, padding=1, mode="joint").form == "joint"
    assert DCDConv2d(64, 64, 3, padding=1, groups=64).form == "depthwise"
    # paper default L = floor(C / 2^floor(log2 sqrt C)) (section 3.2)
    assert [default_latent(c) for c in (16, 64, 128, 256, 512, 960)] == [4, 8, 16, 16, 32, 60]
    assert DCDConv2d(256, 256, 1).latent == 16
    # k x k channel fusion alone: authors' 2x2 context and L = floor(sqrt(4 C))
    m = DCDConv2d(64, 64, 3, padding=1)
    assert (m.pool, m.latent, m.hidden) == (2, 16, 16)
    # joint: L_k = floor(9/2) = 4, L from C / L_k
    j = DCDConv2d(64, 64, 3, padding=1, mode="joint")
    assert (j.latent_kernel, j.latent) == (4, default_latent(16))
    dw = DCDConv2d(32, 32, 3, padding=1, groups=32)
    assert dw.latent_kernel == 4 and dw.P.shape == (32, 4) and dw.R.shape == (9, 4)


def test_parameter_formula_1x1():
    c, r = 64, 16
    m = DCDConv2d(c, c, 1, bias=False)
    L, s = default_latent(c), c // r
    expected = c * c + 2 * c * L + c * s + s * (c + L * L)  # paper section 3.4: C^2 + 2CL + (2C + L^2) C / r
    assert sum(p.numel() for p in m.parameters()) == expected
    no_lambda = DCDConv2d(c, c, 1, bias=False, components=("phi",))
    assert sum(p.numel() for p in no_lambda.parameters()) == expected - s * c
    no_phi = DCDConv2d(c, c, 1, bias=False, components=("lambda",))
    assert sum(p.numel() for p in no_phi.parameters()) == c * c + c * s + s * c


def test_blocks_shrink_the_residual():
    full = DCDConv2d(64, 64, 1, blocks=1)
    sparse = DCDConv2d(64, 64, 1, blocks=4)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(sparse) < count(full)
    x = torch.randn(2, 64, 4, 4)
    w = sparse.dynamic_weight(x) - sparse.weight * sparse.coefficients(x)[0][:, :, None, None, None]
    # off-diagonal blocks of the residual are exactly zero (Eq. 7)
    assert torch.count_nonzero(w[:, :16, 16:]) == 0
    assert torch.count_nonzero(w[:, :16, :16]) > 0


def test_gradcheck_float64():
    torch.manual_seed(0)
    for kwargs in ({"kernel_size": 1}, {"kernel_size": 3, "padding": 1, "stride": 2},
                   {"kernel_size": 3, "padding": 1, "mode": "joint"}, {"kernel_size": 3, "padding": 1, "groups": 4}):
        cout = 4
        m = DCDConv2d(4, cout, **kwargs).double()
        x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_eval_deterministic_and_per_sample_independent():
    torch.manual_seed(0)
    m = DCDConv2d(8, 8, 3, padding=1).eval()
    x = torch.randn(4, 8, 6, 6)
    with torch.no_grad():
        y = m(x)
        torch.testing.assert_close(y, m(x), rtol=0, atol=0)
        torch.testing.assert_close(y[2:3], m(x[2:3]), rtol=1e-5, atol=1e-5)


def test_load_static_weight_and_conv_from_static():
    static = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    m = conv_from_static("dcd:blocks=2", static)
    assert isinstance(m, DCDConv2d) and m.blocks == 2
    torch.testing.assert_close(m.weight, static.weight)
    torch.testing.assert_close(m.bias, static.bias)
    with pytest.raises(ValueError, match="static weight shape"):
        m.load_static_weight(torch.zeros(3, 3, 3, 3))


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = DCDConv2d(16, 16, 3, padding=1, mode="joint")
    b = DCDConv2d(16, 16, 3, padding=1, mode="joint")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(a(x), b(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible by groups"):
        DCDConv2d(10, 16, 3, groups=4)
    with pytest.raises(ValueError, match="blocks"):
        DCDConv2d(16, 16, 1, blocks=3)
    with pytest.raises(ValueError, match="mode"):
        DCDConv2d(16, 16, 3, mode="spatial")
    with pytest.raises(ValueError, match="components"):
        DCDConv2d(16, 16, 1, components=("gamma",))
    with pytest.raises(ValueError, match="valid options"):
        parse_spec("dcd:rank=2")
    with pytest.raises(ValueError, match="lambda/phi"):
        parse_spec("dcd:components=psi")
    with pytest.raises(ValueError, match="expected input"):
        DCDConv2d(16, 16, 1)(torch.randn(1, 8, 4, 4))


def test_spec_options_reach_the_module():
    m = build_conv("dcd:mode=joint,components=phi,reduction=8", 32, 32, 3, padding=1)
    assert m.form == "joint" and not m.use_lambda and m.use_phi and m.hidden == 4
    assert str(parse_spec("dcd:components=lambda+phi")) == "dcd"


def test_dcd_linear_matches_reference_and_seeds_from_linear():
    torch.manual_seed(0)
    lin = nn.Linear(64, 10)
    m = DCDLinear.from_linear(lin)
    assert m.latent == 8 and m.hidden == 4
    torch.testing.assert_close(m.weight, lin.weight)
    x = torch.randn(3, 64, requires_grad=True)
    y = m(x)
    ref = torch.einsum("boc,bc->bo", m.dynamic_weight(x), x) + m.bias
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    gx, = torch.autograd.grad(y.sum(), x)
    gr, = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(gx, gr, rtol=1e-5, atol=1e-5)
    small = DCDLinear(6, 3).double()
    assert torch.autograd.gradcheck(small, (torch.randn(2, 6, dtype=torch.float64, requires_grad=True),), fast_mode=True)
    with pytest.raises(ValueError, match="expected input"):
        m(torch.randn(2, 5))
    with pytest.raises(ValueError, match="components"):
        DCDLinear(4, 4, components=())
