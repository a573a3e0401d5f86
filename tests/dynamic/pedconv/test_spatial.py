"""Spatial-dynamic PEDConv (section 4.6): unfold implementation == explicit per-location loops."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from image_classification.dynamic import build_conv, parse_spec
from image_classification.dynamic.pedconv.spatial import SpatialPEDConv2d


def randomize(module: nn.Module, std: float = 0.3) -> nn.Module:
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "generator" in name or "bias" in name:
                param.normal_(0.0, std)
    return module


def loop_reference(module: SpatialPEDConv2d, x: torch.Tensor) -> torch.Tensor:
    """Eq. 3 at every output location, with components from the MLP on the window-centre channel vector."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = module.kernel_size, module.stride, module.padding, module.dilation
    cin_g, cout_g = module.in_channels // module.groups, module.out_channels // module.groups
    ho, wo = module.output_size(x.shape[2], x.shape[3])
    padded = F.pad(x, (pw, pw, ph, ph))
    gen = module.generator
    out = torch.zeros(x.shape[0], module.out_channels, ho, wo, dtype=x.dtype)
    for b, i, j in itertools.product(range(x.shape[0]), range(ho), range(wo)):
        centre = padded[b, :, i * sh + dh * (kh - 1) // 2, j * sw + dw * (kw - 1) // 2]
        hidden = F.relu(gen.fc_share.weight[:, :, 0, 0] @ centre + gen.fc_share.bias)
        comps = {}
        for name, dim in (("gamma", module.out_channels), ("phi", cin_g), ("psi", kh * kw)):
            if name in module.components:
                head = getattr(gen, f"fc_{name}")
                comps[name] = torch.sigmoid(head.weight[:, :, 0, 0] @ hidden + head.bias).view(module.rank, dim)
            else:
                comps[name] = torch.ones(module.rank, dim, dtype=x.dtype)
        cp = torch.einsum("rt,rs,rk->tsk", comps["gamma"], comps["phi"], comps["psi"]).view(module.weight.shape)
        weight = module.weight * cp
        for t in range(module.out_channels):
            grp = t // cout_g
            window = padded[b, grp * cin_g : (grp + 1) * cin_g, i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                            j * sw : j * sw + dw * (kw - 1) + 1 : dw]
            out[b, t, i, j] = (weight[t] * window).sum()
    if module.bias is not None:
        out = out + module.bias.view(1, -1, 1, 1)
    return out


@pytest.mark.parametrize("geometry,rank,components", [
    ((6, 6, 3, 1, 1, 1, 6), 1, ("gamma", "phi", "psi")),  # depthwise 3x3, the paper's use
    ((4, 8, 3, 2, 1, 1, 4), 2, ("gamma", "psi")),  # depthwise with multiplier, stride 2
    ((4, 6, 3, 1, 2, 2, 2), 1, ("gamma", "phi", "psi")),  # grouped, dilated
    ((3, 4, (3, 1), 1, 0, 1, 1), 2, ("phi",)),  # dense, no padding
])
def test_matches_loop_reference_float64(geometry, rank, components):
    cin, cout, k, s, p, d, g = geometry
    torch.manual_seed(0)
    module = randomize(SpatialPEDConv2d(cin, cout, k, s, p, d, g, rank=rank, components=components,
                                        sampling="none")).double().eval()
    x = torch.randn(2, cin, 5, 6, dtype=torch.float64)
    out = module(x)
    assert out.shape == nn.Conv2d(cin, cout, k, s, p, d, g)(x.float()).shape
    torch.testing.assert_close(out, loop_reference(module, x), rtol=1e-10, atol=1e-10)
    # dynamic_weight agrees with the per-location loop too
    weights = module.dynamic_weight(x)
    assert weights.shape == (2, cout, cin // g, *module.kernel_size, *out.shape[-2:])
    (kh, kw), (ho, wo) = module.kernel_size, out.shape[-2:]
    patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    patches = patches.view(2, g, cin // g, kh * kw, ho, wo)
    weights = weights.reshape(2, g, cout // g, cin // g, kh * kw, ho, wo)
    via_weights = torch.einsum("bgoskyx,bgskyx->bgoyx", weights, patches).reshape(2, cout, ho, wo)
    torch.testing.assert_close(via_weights + module.bias.view(1, -1, 1, 1), out, rtol=1e-10, atol=1e-10)


def test_gradcheck_and_float32_backward():
    torch.manual_seed(1)
    module = randomize(SpatialPEDConv2d(4, 4, 3, padding=1, groups=4, rank=2, sampling="none")).double()
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_sampling_infomax_and_eval():
    torch.manual_seed(2)
    module = SpatialPEDConv2d(8, 8, 3, padding=1, groups=8).train()
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    assert not torch.allclose(module(x), module(x))
    term = module.infomax_term()
    assert term is not None and term.item() > 0
    grads = dict(zip(["x", *(n for n, _ in module.named_parameters())],
                     torch.autograd.grad(term, [x, *module.parameters()], allow_unused=True)))
    assert grads["infomax_decoder.0.weight"].abs().sum() > 0 and grads["generator.fc_share.weight"].abs().sum() > 0
    assert grads["weight"] is None
    module.eval()
    out = module(x)
    assert module.infomax_term() is None
    torch.testing.assert_close(module(x), out, rtol=0, atol=0)
    torch.testing.assert_close(module(x[1:]), out[1:], rtol=1e-5, atol=1e-5)
    none = SpatialPEDConv2d(8, 8, 3, padding=1, groups=8, sampling="none").train()
    torch.testing.assert_close(none(x), none(x), rtol=0, atol=0)


def test_spec_state_dict_and_errors():
    spec = parse_spec("pedconv_spatial:reduction=4,components=psi,sampling=learned")
    module = build_conv(spec, 16, 16, 3, padding=1, groups=16)
    assert isinstance(module, SpatialPEDConv2d) and module.hidden == 4 and module.components == ("psi",)
    assert hasattr(module.generator, "fc_psi_logvar")
    copy = build_conv(spec, 16, 16, 3, padding=1, groups=16)
    copy.load_state_dict(module.state_dict())
    x = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(copy.eval()(x), module.eval()(x))
    with pytest.raises(ValueError, match="divisible by groups"):
        SpatialPEDConv2d(6, 8, 3, groups=4)
    with pytest.raises(ValueError, match="rank"):
        parse_spec("pedconv_spatial:rank=0")
    with pytest.raises(ValueError, match="unknown option"):
        parse_spec("pedconv_spatial:path=fold")
