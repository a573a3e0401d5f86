"""DCD (Li et al. 2021, Eq. 6-9): fast path == per-sample reference conv, gradients, geometry, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet as tv

from image_classification.dynamic import build_conv, conv_from_static, parse_spec
from image_classification.dynamic.peers.dcd import (
    DCDConv2d,
    DCDLinear,
    convert_released_state_dict,
    default_latent,
    is_released_state_dict,
)
from image_classification.measurement.macs import count_params
from image_classification.models import build_model, convert_model
from image_classification.training.checkpoint import CheckpointError, load_model_weights


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
    assert torch.autograd.gradcheck(small, (torch.randn(2, 6, dtype=torch.float64, requires_grad=True),),
                                    fast_mode=True)
    with pytest.raises(ValueError, match="expected input"):
        m(torch.randn(2, 5))
    with pytest.raises(ValueError, match="components"):
        DCDLinear(4, 4, components=())


# ------------------------------------------------------------------------------------------------
# variant=released: the authors' release, against an independent re-implementation written here from
# the paper's equations plus the release's listed differences (BatchNorm + identity in the residual,
# gated branch, bias scaled by Lambda, released sizes), with the release's parameter names.
# ------------------------------------------------------------------------------------------------
def hsig(z: torch.Tensor) -> torch.Tensor:
    return F.relu6(z + 3) / 3


class Gate(nn.Module):
    """x * hsigmoid(G x); G an FC without bias (parameter name fc.0.weight, as released)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c, c, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * hsig(self.fc(x))


def released_layer_sizes(rule: str, cin: int, cout: int, squeeze: int = 16) -> tuple:
    """(pool, L, s) as the released modules compute them (resnet_dcd.py / mobilenetv2_dcd.py)."""
    import math

    if rule == "basic":  # conv_basic_dy
        dim = int(math.sqrt(cin * 4))
        return 2, dim, max(4, max(cin * 4, dim * dim) // squeeze)
    if rule == "bottleneck":  # conv_dy
        dim = int(math.sqrt(cin))
        return 1, dim, max(cin, dim * dim) // squeeze
    mul, red = (4, 8) if cin < cout else (1, 2)  # DYModule
    dim = min(cin * mul // red, cout // red)
    while dim * dim > cin * mul * 2:
        red *= 2
        dim = min(cin * mul // red, cout // red)
    dim = max(dim, 4)
    return (2 if mul == 4 else 1), dim, max(4, max(cin * mul, dim * dim) // squeeze)


class ReleasedConv(nn.Module):
    """out = P(BN2(Phi BN1(Q x)) + BN1(Q x)) + Lambda conv(x); Q a strided 1x1 conv, Phi, Lambda from
    FC(pool(x)) -> gate -> FC; names of conv_dy/conv_basic_dy (q, p) or DYModule (conv_q, conv_p)."""

    def __init__(self, cin, cout, k, stride, rule, squeeze=16, names=("q", "p")) -> None:
        super().__init__()
        self.pool, self.dim, hidden = released_layer_sizes(rule, cin, cout, squeeze)
        self.names = names
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        setattr(self, names[0], nn.Conv2d(cin, self.dim, 1, stride, 0, bias=False))
        setattr(self, names[1], nn.Conv2d(self.dim, cout, 1, bias=False))
        self.bn1 = nn.BatchNorm2d(self.dim)
        self.bn2 = nn.BatchNorm1d(self.dim)
        self.fc = nn.Sequential(nn.Linear(cin * self.pool ** 2, hidden, bias=False), Gate(hidden))
        self.fc_phi = nn.Linear(hidden, self.dim ** 2, bias=False)
        self.fc_scale = nn.Linear(hidden, cout, bias=False)

    def forward(self, x):
        b = x.shape[0]
        y = self.fc(F.adaptive_avg_pool2d(x, self.pool).reshape(b, -1))
        phi = self.fc_phi(y).view(b, self.dim, self.dim)
        r = self.conv(x) * hsig(self.fc_scale(y))[:, :, None, None]
        z = self.bn1(getattr(self, self.names[0])(x))
        flat = z.flatten(2)
        flat = self.bn2(phi @ flat) + flat
        return getattr(self, self.names[1])(flat.view_as(z)) + r


class ReleasedDYCls(nn.Module):
    """y = Lambda (W0 x + b) + P(BN2(Phi BN1(Q x)) + BN1(Q x)), L = s = 32 (the release's DYCls)."""

    def __init__(self, cin, cout) -> None:
        super().__init__()
        self.cls = nn.Linear(cin, cout)
        self.cls_q = nn.Linear(cin, 32, bias=False)
        self.cls_p = nn.Linear(32, cout, bias=False)
        self.fc = nn.Sequential(nn.Linear(cin, 32, bias=False), Gate(32))
        self.fc_phi = nn.Linear(32, 32 * 32, bias=False)
        self.fc_scale = nn.Linear(32, cout, bias=False)
        self.bn1 = nn.BatchNorm1d(32)
        self.bn2 = nn.BatchNorm1d(32)

    def forward(self, x):
        b = x.shape[0]
        y = self.fc(x)
        phi = self.fc_phi(y).view(b, 32, 32)
        r = hsig(self.fc_scale(y)) * self.cls(x)
        z = self.bn1(self.cls_q(x))
        z = self.bn2((phi @ z.unsqueeze(2)).squeeze(2)) + z
        return self.cls_p(z) + r


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights and BatchNorm statistics, so every term of the equations shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
    return module


def _to_project(released: nn.Module, layout_prefix: str = "layer1.0.conv1") -> dict:
    sd = {f"{layout_prefix}.{k}": v for k, v in released.state_dict().items()}
    from image_classification.dynamic.peers.dcd import convert_released_state_dict

    return {k[len(layout_prefix) + 1:]: v for k, v in convert_released_state_dict(sd).items()}


RELEASED_LAYERS = [
    # cin, cout, k, stride, rule (resnet_dcd.py conv_basic_dy / conv_dy, mobilenetv2_dcd.py DYModule)
    (16, 16, 3, 1, "basic"),
    (16, 32, 3, 2, "basic"),
    (64, 16, 1, 1, "bottleneck"),
    (16, 16, 3, 2, "bottleneck"),
    (16, 96, 1, 1, "mobilenetv2"),
    (96, 24, 1, 1, "mobilenetv2"),
]
SIZING = {"basic": "resnet_basic", "bottleneck": "resnet_bottleneck", "mobilenetv2": "mobilenetv2"}


@pytest.mark.parametrize("geom", RELEASED_LAYERS, ids=[f"{g[4]}-{g[0]}-{g[1]}-k{g[2]}s{g[3]}" for g in RELEASED_LAYERS])
def test_released_conv_equals_the_release(geom):
    cin, cout, k, stride, rule = geom
    torch.manual_seed(0)
    names = ("conv_q", "conv_p") if rule == "mobilenetv2" else ("q", "p")
    ref = _randomize(ReleasedConv(cin, cout, k, stride, rule, names=names))
    ours = DCDConv2d(cin, cout, k, stride, k // 2, bias=False, variant="released", sizing=SIZING[rule])
    assert (ours.pool, ours.latent, ours.hidden) == (ref.pool, ref.dim, ref.fc[0].out_features)
    ours.load_state_dict(_to_project(ref))
    x = torch.randn(3, cin, 8, 8)
    # training mode: BatchNorm on batch statistics, the running statistics move the same way
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ref, y = ref(x1), ours(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.bn_q.running_mean, ref.bn1.running_mean)
    torch.testing.assert_close(ours.bn_phi.running_var, ref.bn2.running_var)
    g = torch.randn_like(y)
    gx_ref, gq_ref, gfc_ref = torch.autograd.grad(y_ref, [x1, getattr(ref, names[0]).weight, ref.fc[0].weight], g)
    gx, gq, gfc = torch.autograd.grad(y, [x2, ours.Q, ours.fc1.weight], g)
    for a, b in ((gx, gx_ref), (gq, gq_ref), (gfc, gfc_ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # eval mode: running statistics; every path, batch 1 and 3, and the folded per-sample weight + bias
    ref.eval()
    ours.eval()
    with torch.no_grad():
        for batch in (3, 1):
            xe = x[:batch]
            want = ref(xe)
            for path in ("auto", "branch", "fold"):
                ours.path = path
                torch.testing.assert_close(ours(xe), want, rtol=1e-5, atol=1e-5)
            w, bias = ours.dynamic_weight(xe), ours.dynamic_bias(xe)
            per = torch.cat([F.conv2d(xe[i:i + 1], w[i], bias[i], stride, k // 2) for i in range(batch)])
            torch.testing.assert_close(per, want, rtol=1e-5, atol=1e-5)


def test_released_linear_equals_the_release_and_scales_the_bias():
    torch.manual_seed(0)
    ref = _randomize(ReleasedDYCls(64, 10))
    ours = DCDLinear(64, 10, variant="released")
    assert (ours.latent, ours.hidden) == (32, 32)
    sd = {f"classifier.1.{k}": v for k, v in ref.state_dict().items()}
    sd["layer1.0.conv1.weight"] = torch.zeros(1)  # marks the ResNet layout: classifier.<i> -> fc
    from image_classification.dynamic.peers.dcd import convert_released_state_dict

    converted = convert_released_state_dict(sd)
    ours.load_state_dict({k[len("fc."):]: v for k, v in converted.items() if k.startswith("fc.")})
    x = torch.randn(4, 64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    ref.eval()
    ours.eval()
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)
        folded = torch.einsum("boc,bc->bo", ours.dynamic_weight(x), x) + ours.dynamic_bias(x)
        torch.testing.assert_close(folded, want, rtol=1e-5, atol=1e-5)
        # Lambda scales the bias: with Phi's path off, y = Lambda (W0 x + b)
        lam, _ = ours.coefficients(x)
        assert not torch.allclose(lam, torch.ones_like(lam))
    small = DCDLinear(6, 3, variant="released").double().eval()
    assert torch.autograd.gradcheck(small, (torch.randn(2, 6, dtype=torch.float64, requires_grad=True),),
                                    fast_mode=True)


def test_released_gradcheck_and_bias_semantics():
    torch.manual_seed(0)
    m = DCDConv2d(4, 4, 3, padding=1, variant="released", sizing="resnet_basic").double()
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-5, fast_mode=True)
    m.eval()
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-5, fast_mode=True)
    # bias=True: the release scales it by Lambda (Lambda (W0 x + b)), the paper variant adds it after
    r = DCDConv2d(4, 4, 1, bias=True, variant="released", components=("lambda",)).eval()
    with torch.no_grad():
        lam, _ = r.coefficients(x.float())
        want = (F.conv2d(x.float(), r.weight) + r.bias[:, None, None]) * lam[:, :, None, None]
        torch.testing.assert_close(r(x.float()), want, rtol=1e-5, atol=1e-5)


def test_released_sizes_and_options():
    from image_classification.dynamic.peers.dcd import released_sizes

    # conv_dy: L = floor(sqrt(C)) where the paper's formula gives 16 / 32 / 64
    for c, paper, released in ((128, 16, 11), (512, 32, 22), (2048, 64, 45)):
        assert DCDConv2d(c, c, 1).latent == paper
        assert DCDConv2d(c, c, 1, variant="released").latent == released
    assert released_sizes("resnet_basic", 64, 64, 16) == (2, 16, 16)
    assert released_sizes("resnet_bottleneck", 256, 64, 16) == (1, 16, 16)
    assert released_sizes("mobilenetv2", 24, 144, 8) == (2, 12, 18)  # expanding: 2x2 context, s from L^2
    assert released_sizes("mobilenetv2", 144, 24, 8) == (1, 12, 18)
    m = build_conv("dcd:variant=released,sizing=resnet_basic", 64, 64, 3, padding=1)
    assert (m.pool, m.latent, m.hidden, m.variant) == (2, 16, 16, "released") and m.gate is not None
    assert str(parse_spec("dcd:variant=released")) == "dcd:variant=released"
    with pytest.raises(ValueError, match="no depthwise form"):
        DCDConv2d(8, 8, 3, padding=1, groups=8, variant="released")
    with pytest.raises(ValueError, match="no joint form"):
        DCDConv2d(8, 8, 3, padding=1, mode="joint", variant="released")
    with pytest.raises(ValueError, match="channel-fusion form only"):
        DCDConv2d(8, 8, 3, padding=1, groups=8, sizing="resnet_bottleneck")
    with pytest.raises(ValueError, match="valid: paper, released"):
        parse_spec("dcd:variant=authors")
    t = DCDConv2d(8, 8, 1, variant="released").train()
    t.path = "fold"
    with pytest.raises(ValueError, match="eval mode only"):
        t(torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match="eval mode only"):
        t.dynamic_weight(torch.randn(2, 8, 3, 3))


# ------------------------------------------------------------------------------------------------
# Whole released networks (ResNet of resnet_dcd.py: BasicBlock and Bottleneck; MobileNetV2 of
# mobilenetv2_dcd.py in tonylins' layout) rebuilt here with the release's module names, converted by
# convert_released_state_dict and by load_model_weights.
# ------------------------------------------------------------------------------------------------


def released_resnet(block: type, layers: list, num_classes: int) -> nn.Module:
    """resnet_dcd.py's ResNet: every block conv a released DCD layer, classifier = Dropout + DYCls."""
    model = tv.ResNet(block, layers, num_classes=num_classes)
    for blk in model.modules():
        if isinstance(blk, tv.BasicBlock):
            blk.conv1 = ReleasedConv(blk.conv1.in_channels, blk.conv1.out_channels, 3, blk.stride, "basic")
            blk.conv2 = ReleasedConv(blk.conv2.in_channels, blk.conv2.out_channels, 3, 1, "basic")
        elif isinstance(blk, tv.Bottleneck):
            blk.conv1 = ReleasedConv(blk.conv1.in_channels, blk.conv1.out_channels, 1, 1, "bottleneck")
            blk.conv2 = ReleasedConv(blk.conv2.in_channels, blk.conv2.out_channels, 3, blk.stride, "bottleneck")
            blk.conv3 = ReleasedConv(blk.conv3.in_channels, blk.conv3.out_channels, 1, 1, "bottleneck")
    model.classifier = nn.Sequential(nn.Dropout(0.0), ReleasedDYCls(model.fc.in_features, num_classes))
    model.fc = nn.Identity()
    model.forward_features = model.forward
    model.forward = lambda x: model.classifier(model.forward_features(x))
    return model


def _divisible(v: float, d: int = 8) -> int:
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


class ReleasedInvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, t: int, squeeze: int) -> None:
        super().__init__()
        hidden = round(inp * t)
        self.identity = stride == 1 and inp == oup
        names = ("conv_q", "conv_p")
        dw = [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        if t == 1:  # the release ignores 'dy' here: static depthwise + projection
            self.conv = nn.Sequential(*dw, nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup))
        else:
            self.conv = nn.Sequential(
                ReleasedConv(inp, hidden, 1, 1, "mobilenetv2", squeeze, names), nn.BatchNorm2d(hidden), nn.ReLU6(),
                *dw, ReleasedConv(hidden, oup, 1, 1, "mobilenetv2", squeeze, names), nn.BatchNorm2d(oup))

    def forward(self, x):
        return x + self.conv(x) if self.identity else self.conv(x)


class ReleasedMobileNetV2(nn.Module):
    """mobilenetv2_dcd.py's network (tonylins' module layout)."""

    def __init__(self, width: float, num_classes: int, squeeze: int) -> None:
        super().__init__()
        cin = _divisible(32 * width)
        layers: list = [nn.Sequential(nn.Conv2d(3, cin, 3, 2, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6())]
        for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                           (6, 320, 1, 1)):
            for i in range(n):
                layers.append(ReleasedInvertedResidual(cin, _divisible(c * width), s if i == 0 else 1, t, squeeze))
                cin = _divisible(c * width)
        self.features = nn.Sequential(*layers)
        self.conv = nn.Sequential(nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6())
        self.classifier = nn.Sequential(nn.Dropout(0.0), ReleasedDYCls(1280, num_classes))

    def forward(self, x):
        x = self.conv(self.features(x)).mean((2, 3))
        return self.classifier(x)


def _prepare_network(model: nn.Module, seed: int = 0, size: int = 32) -> nn.Module:
    """Random dynamic branches and residual BatchNorms, then every BatchNorm's running statistics set
    from two batches (an untrained deep net with random statistics overflows in eval mode).

    The running variances are floored at 1e-2: channels that ReLU left nearly dead get variances near
    1e-8, whose 1/sqrt(var + eps) gains compound over a deep net until float64 rounding (the eval path
    folds the residual BatchNorms, another order of the same operations) shows as 1e-3 differences on
    some inputs; with the floor the worst of 40 seeded inputs is 5e-9, at 1 and 2 threads alike."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # moderate values: a deep untrained net must stay well conditioned in eval mode
        for module in model.modules():
            if isinstance(module, (ReleasedConv, ReleasedDYCls)):
                for part in ("fc", "fc_phi", "fc_scale"):
                    for p in getattr(module, part).parameters():
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                for bn in (module.bn1, module.bn2):
                    bn.weight.copy_(1 + 0.2 * torch.randn(bn.weight.shape, generator=gen))
                    bn.bias.copy_(0.2 * torch.randn(bn.bias.shape, generator=gen))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, size, size, generator=gen))
    for m in norms:
        m.momentum = 0.1
        m.running_var.clamp_(min=1e-2)
    return model


def _assert_same_network(released: nn.Module, ours: nn.Module, size: int = 32, seed: int = 0) -> None:
    """Equal in training mode (BatchNorm on batch statistics) and eval mode (batch 1: folded weights).

    float64: at 32 px the last stage is 1x1, so training-mode BatchNorm over a batch of 2 amplifies
    float32 rounding (1e-3 apart in float32, 1e-11 in float64). In eval mode the networks of
    :func:`_prepare_network` agree to 5e-9 (the eval path folds the residual BatchNorms, a different
    order of the same operations), so 1e-6 leaves room while a misplaced tensor is off by O(1); the
    layers themselves are compared exactly above. The input has its own generator: the result must not
    depend on what earlier tests left in the global random stream."""
    released, ours = released.double(), ours.double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    released.train()
    ours.train()
    torch.testing.assert_close(ours(x), released(x), rtol=1e-8, atol=1e-8)
    released.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), released(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours(x[:1]), released(x[:1]), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("block, layers", [(tv.BasicBlock, [1, 1, 1, 1]), (tv.Bottleneck, [1, 1, 1, 1])],
                         ids=["basicblock", "bottleneck"])
def test_released_resnet_state_dict_loads_and_matches(block, layers):
    torch.manual_seed(0)
    released = _prepare_network(released_resnet(block, layers, 10))
    state = {"module." + k: v for k, v in released.state_dict().items()}  # the release trains in DataParallel
    assert is_released_state_dict({"state_dict": state})
    ours = convert_model(tv.ResNet(block, layers, num_classes=10), "dcd:variant=released", "paper+cls")
    ours.load_state_dict(convert_released_state_dict({"state_dict": state}), strict=True)
    sizing = {m.sizing for m in ours.modules() if isinstance(m, DCDConv2d)}
    assert sizing == {"resnet_basic" if block is tv.BasicBlock else "resnet_bottleneck"}
    _assert_same_network(released, ours)


@pytest.mark.slow
def test_released_mobilenet_v2_state_dict_loads_and_matches():
    torch.manual_seed(0)
    released = _prepare_network(ReleasedMobileNetV2(0.35, 10, squeeze=8), size=16)
    ours = build_model("mobilenet_v2", "dcd:variant=released,reduction=8", "pointwise+inblock+cls", num_classes=10,
                       width_mult=0.35, dropout=0.0)
    # the release keeps the expansion-1 block and the 1x1 head conv static
    assert "features.1.conv.1" not in ours.dynamic_convs and "features.18.0" not in ours.dynamic_convs
    assert len(ours.dynamic_convs) == 2 * 16 + 1
    ours.load_state_dict(convert_released_state_dict(released.state_dict()), strict=True)
    _assert_same_network(released, ours, size=16)  # float64 depthwise convs are slow on CPU: small input


def test_load_model_weights_converts_the_release_and_refuses_other_operators(tmp_path):
    torch.manual_seed(0)
    released = _prepare_network(released_resnet(tv.BasicBlock, [1, 1, 1, 1], 10))
    path = tmp_path / "resnet_dcd.pth.tar"
    torch.save({"epoch": 100, "arch": "resnet10_dcd", "best_prec1": 1.0,  # what the release saves
                "state_dict": {"module." + k: v for k, v in released.state_dict().items()}}, path)
    ours = convert_model(tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=10), "dcd:variant=released", "paper+cls")
    load_model_weights(ours, path, expected_conv="dcd:variant=released")
    _assert_same_network(released, ours)
    paper = convert_model(tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=10), "dcd", "paper+cls")
    with pytest.raises(CheckpointError, match="dcd:variant=released"):
        load_model_weights(paper, path, expected_conv="dcd")


def test_bad_released_layouts_are_refused():
    good = {"layer1.0.conv1.fc_scale.weight": torch.zeros(4, 2), "layer1.0.conv1.fc_phi.weight": torch.zeros(4, 2),
            "layer1.0.conv1.conv.weight": torch.zeros(4, 4, 3, 3)}
    assert set(convert_released_state_dict(good)) == {"layer1.0.conv1.fc2.weight", "layer1.0.conv1.weight"}
    with pytest.raises(ValueError, match="unknown parameter layer1.0.conv1.extra.weight"):
        convert_released_state_dict({**good, "layer1.0.conv1.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no fc_phi.weight"):
        convert_released_state_dict({k: v for k, v in good.items() if "fc_phi" not in k})
    with pytest.raises(ValueError, match="neither the release's ResNet"):
        convert_released_state_dict({"blocks.0.fc_scale.weight": torch.zeros(1),
                                     "blocks.0.fc_phi.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="cannot place 'features.2.conv.5'"):
        convert_released_state_dict({"features.2.conv.0.fc_scale.weight": torch.zeros(1),
                                     "features.2.conv.0.fc_phi.weight": torch.zeros(1),
                                     "features.2.conv.5.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no DCD layer"):
        convert_released_state_dict({"layer1.0.conv1.weight": torch.zeros(1)})


def test_released_parameter_counts():
    """resnet_dcd.py's ResNet-50 has 29.84M parameters (27.56M without its DYCls classifier); ResNet-18
    14.06M without it (DCD Table 4b prints 30.7M and 14.0M)."""
    r50 = count_params(build_model("resnet50", "dcd:variant=released", "paper+cls")).deploy
    assert abs(r50 / 1e6 - 29.835) < 0.001
    r18 = build_model("resnet18", "dcd:variant=released", "paper+cls")
    assert abs((count_params(r18).deploy - count_params(r18.fc).deploy) / 1e6 - 14.059) < 0.001
    # and the same network built here from the release's module definitions
    assert count_params(released_resnet(tv.Bottleneck, [3, 4, 6, 3], 1000)).deploy == r50


@pytest.mark.parametrize("spec", ["dcd:blocks=2", "dcd:blocks=2,variant=released", "dcd:blocks=2,mode=joint"])
def test_channels_last_keeps_the_low_rank_residual(spec: str) -> None:
    """With several blocks the B x nb flattening of a channels_last output is a copy: the residual P Phi Q^T x
    must reach the output (not only the copy), forward and backward."""
    torch.manual_seed(0)
    layer = build_conv(spec, 32, 32, 3, padding=1)
    if "released" not in spec:
        layer.path = "branch"
    x = torch.randn(4, 32, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    layer = layer.double().eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x.contiguous(memory_format=torch.channels_last)), layer(x))
    layer.train()
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        xi = x.detach().clone(memory_format=fmt).requires_grad_(True)
        out = layer(xi)
        (out * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin()).sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[0])
