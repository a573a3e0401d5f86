"""The lean PEDConv kernels (Eq. 3, rank 1, and the materialized Eq. 2 / Appendix E): exact against a
per-sample F.conv2d reference in float64 (output and every gradient), gradcheck, saved-tensor bytes
against their formula, autocast and channels_last."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from image_classification.dynamic.pedconv.kernels import (
    ENGINES,
    materialized_conv,
    saved_tensor_bytes,
    scaled_conv,
)

GEOMETRIES = [
    # in, out, kernel, stride, padding, dilation, groups
    (8, 12, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (8, 12, (3, 3), (2, 2), (1, 1), (2, 2), 2),
    (5, 7, (3, 3), (2, 1), (2, 1), (2, 1), 1),  # groups 1: the channels-last patch GEMM at batch > 1
    (8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 8),  # depthwise
    (4, 8, (3, 3), (2, 2), (0, 0), (1, 1), 4),  # depthwise with channel multiplier
    (6, 9, (1, 1), (2, 2), (0, 0), (1, 1), 3),
    (4, 6, (3, 1), (1, 2), (1, 0), (1, 1), 1),
]
COMPONENT_SETS = [("gamma", "phi", "psi"), ("phi", "psi"), ("gamma",), ("psi",), ("gamma", "phi")]


def plain(x, weight, gamma, phi, psi, geometry, additive=False):
    """Per-sample F.conv2d with W * (gamma (x) phi (x) psi) (or W + ... for additive), factors B x R x dim."""
    stride, padding, dilation, groups = geometry
    out = []
    for b in range(x.shape[0]):
        cp = torch.einsum("ro,rc,rk->ock", gamma[b], phi[b], psi[b]).reshape(weight.shape)
        w = weight + cp if additive else weight * cp
        out.append(F.conv2d(x[b : b + 1], w, None, stride, padding, dilation, groups))
    return torch.cat(out)


def make(geometry_row, comps, batch, dtype=torch.float64, seed=0):
    cin, cout, kernel, stride, padding, dilation, groups = geometry_row
    g = torch.Generator().manual_seed(seed)
    kk = kernel[0] * kernel[1]
    x = torch.randn(batch, cin, 7, 6, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(cout, cin // groups, *kernel, generator=g, dtype=dtype).requires_grad_()
    factors = {
        "gamma": torch.rand(batch, cout, generator=g, dtype=dtype),
        "phi": torch.rand(batch, cin // groups, generator=g, dtype=dtype),
        "psi": torch.rand(batch, kk, generator=g, dtype=dtype),
    }
    factors = {k: (v.requires_grad_() if k in comps else None) for k, v in factors.items()}
    return x, weight, factors, (stride, padding, dilation, groups)


def full(factors, x, weight):
    batch = x.shape[0]
    dims = {"gamma": weight.shape[0], "phi": weight.shape[1], "psi": weight.shape[2] * weight.shape[3]}
    return [(factors[n] if factors[n] is not None else x.new_ones(batch, dims[n]))[:, None]
            for n in ("gamma", "phi", "psi")]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("comps", COMPONENT_SETS)
@pytest.mark.parametrize("batch", [1, 3])
def test_scaled_conv_equals_plain_formula(geometry, engine, comps, batch):
    x, weight, f, geo = make(geometry, comps, batch)
    if engine == "dense" and f["psi"] is not None and geometry[2] != (1, 1):
        with pytest.raises(ValueError, match="1x1"):
            scaled_conv(x, weight, f["gamma"], f["phi"], f["psi"], geo, engine)
        return
    out = scaled_conv(x, weight, f["gamma"], f["phi"], f["psi"], geo, engine)
    expected = plain(x, weight, *full(f, x, weight), geo)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    inputs = [t for t in (x, weight, f["gamma"], f["phi"], f["psi"]) if t is not None]
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad_out)
    want = torch.autograd.grad(expected, inputs, grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("engine", ENGINES)
def test_scaled_conv_gradcheck(engine):
    geometry = (4, 6, (3, 3), (2, 2), (1, 1), (1, 1), 2) if engine != "dense" else (4, 6, (1, 1), (1, 1), (0, 0),
                                                                                     (1, 1), 2)
    x, weight, f, geo = make(geometry, ("gamma", "phi", "psi"), 2)
    assert torch.autograd.gradcheck(lambda *t: scaled_conv(*t, geo, engine),
                                    (x, weight, f["gamma"], f["phi"], f["psi"]), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_materialized_conv_rank_r_equals_plain_and_gradcheck(additive, batch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 8, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(12, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    gamma, phi, psi = (torch.rand(batch, 2, d, generator=g, dtype=torch.float64, requires_grad=True)
                       for d in (12, 4, 9))
    geo = ((2, 2), (1, 1), (1, 1), 2)
    out = materialized_conv(x, weight, gamma, phi, psi, geo, additive)
    torch.testing.assert_close(out, plain(x, weight, gamma, phi, psi, geo, additive), rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda *t: materialized_conv(*t, geo, additive), (x, weight, gamma, phi, psi),
                                    eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_saved_tensor_bytes_are_input_output_and_factors(engine):
    """Lean: autograd keeps x, the output y and the factors - no scaled copy, patches or per-sample weight."""
    batch, cin, cout, size = 4, 16, 24, 10
    kernel = (1, 1) if engine == "dense" else (3, 3)
    x = torch.randn(batch, cin, size, size, requires_grad=True)
    weight = torch.randn(cout, cin, *kernel, requires_grad=True)
    gamma = torch.rand(batch, cout, requires_grad=True)
    phi = torch.rand(batch, cin, requires_grad=True)
    psi = torch.rand(batch, kernel[0] * kernel[1], requires_grad=True)
    geo = ((1, 1), (kernel[0] // 2, kernel[1] // 2), (1, 1), 1)
    saved = saved_tensor_bytes(lambda: scaled_conv(x, weight, gamma, phi, psi, geo, engine), exclude=(weight,))
    out_numel = batch * cout * size * size
    factors = gamma.numel() + phi.numel() + psi.numel()
    scale = batch * cout if engine == "dense" else 0  # dense also saves s = gamma * psi (B x C_out)
    assert saved == 4 * (x.numel() + out_numel + factors + scale)


def test_materialized_saved_tensor_bytes_are_input_and_factors():
    x = torch.randn(4, 16, 10, 10, requires_grad=True)
    weight = torch.randn(24, 16, 3, 3, requires_grad=True)
    gamma, phi, psi = (torch.rand(4, 1, d, requires_grad=True) for d in (24, 16, 9))
    saved = saved_tensor_bytes(lambda: materialized_conv(x, weight, gamma, phi, psi, ((1, 1), (1, 1), (1, 1), 1)),
                               exclude=(weight,))
    assert saved == 4 * (x.numel() + gamma.numel() + phi.numel() + psi.numel())


@pytest.mark.parametrize("engine", ["grouped", "gemm"])
def test_autocast_runs_in_the_autocast_dtype_and_matches(engine):
    x, weight, f, geo = make(GEOMETRIES[0], ("gamma", "phi", "psi"), 2, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scaled_conv(x, weight, f["gamma"], f["phi"], f["psi"], geo, engine)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    expected = plain(x, weight, *full(f, x, weight), geo)
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("engine", ENGINES)
def test_channels_last_input(engine):
    kernel = (1, 1) if engine == "dense" else (3, 3)
    row = (8, 12, kernel, (1, 1), (kernel[0] // 2, kernel[1] // 2), (1, 1), 1)
    x, weight, f, geo = make(row, ("gamma", "phi", "psi"), 3)
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    out = scaled_conv(xc, weight, f["gamma"], f["phi"], f["psi"], geo, engine)
    torch.testing.assert_close(out, plain(x, weight, *full(f, x, weight), geo), rtol=1e-10, atol=1e-10)
    out.sum().backward()
    torch.testing.assert_close(xc.grad, torch.autograd.grad(plain(x, weight, *full(f, x, weight), geo).sum(), x)[0])


def test_gamma_underflow_gives_zero_gradient_not_nan():
    x, weight, f, geo = make(GEOMETRIES[0], ("gamma", "phi", "psi"), 2)
    gamma = f["gamma"].detach().clone()
    gamma[0, :3] = 0.0
    gamma.requires_grad_()
    for engine in ("grouped", "gemm"):
        out = scaled_conv(x, weight, gamma, f["phi"], f["psi"], geo, engine)
        (grad,) = torch.autograd.grad(out.sum(), gamma)
        assert torch.isfinite(grad).all()
        plain_out = plain(x, weight, gamma[:, None], f["phi"][:, None], f["psi"][:, None], geo)
        expected = torch.autograd.grad(plain_out.sum(), gamma)[0]
        torch.testing.assert_close(grad[:, 3:], expected[:, 3:])


def test_bad_engine():
    x, weight, f, geo = make(GEOMETRIES[0], ("gamma",), 1)
    with pytest.raises(ValueError, match="unknown engine"):
        scaled_conv(x, weight, f["gamma"], None, None, geo, "winograd")


@pytest.mark.parametrize("geometry", [GEOMETRIES[1], GEOMETRIES[4], (6, 9, (1, 1), (1, 1), (0, 0), (1, 1), 3)])
@pytest.mark.parametrize("comps", COMPONENT_SETS[:2])
@pytest.mark.parametrize("batch", [1, 3])
def test_inference_forward_equals_formula(geometry, comps, batch):
    """Without autograd the kernels skip the Functions (and at batch 1 take weight-side shortcuts): same result."""
    x, weight, f, geo = make(geometry, comps, batch)
    expected = plain(x, weight, *full(f, x, weight), geo)
    with torch.no_grad():
        for engine in ENGINES:
            if engine == "dense" and f["psi"] is not None and geometry[2] != (1, 1):
                continue
            out = scaled_conv(x, weight, f["gamma"], f["phi"], f["psi"], geo, engine)
            torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10, msg=engine)
        out = materialized_conv(x, weight, *full(f, x, weight), geo)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("additive", [False, True])
def test_materialized_pointwise_batched_matmul(additive):
    """1x1, stride 1: the per-sample weights run as a batched matmul (groups too); exact and gradcheck."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 2, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    gamma, phi, psi = (torch.rand(3, 2, d, generator=g, dtype=torch.float64, requires_grad=True) for d in (9, 2, 1))
    geo = ((1, 1), (0, 0), (1, 1), 3)
    out = materialized_conv(x, weight, gamma, phi, psi, geo, additive)
    torch.testing.assert_close(out, plain(x, weight, gamma, phi, psi, geo, additive), rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda *t: materialized_conv(*t, geo, additive), (x, weight, gamma, phi, psi),
                                    eps=1e-6, atol=1e-6)
