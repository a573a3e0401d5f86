"""PEDConv's export forms (image_classification/dynamic/pedconv/export_forms.py): the 0/1 selector convolutions are
im2col exactly, each form equals the plain per-sample formula (Eq. 2) in float64 for every option set the recipes
use (forward and gradcheck; tests/dynamic/pedconv/test_pedconv.py also runs them over every geometry), and an
export form is held as non-persistent buffers, never in a state dict."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from image_classification.dynamic.pedconv import EXPORT_FORMS, PEDConv2d, applicable_forms, form_rule
from image_classification.dynamic.pedconv.export_forms import SELECTOR_BUFFERS, tap_selector

FORMS = [f for f in EXPORT_FORMS]
#: the option sets of configs/ (PEDConv Table 5 ablations, Appendix D/E; additive is refused by the export)
OPTION_SETS = [
    {}, {"sampling": "none"}, {"components": ("psi",)}, {"components": ("phi",)}, {"components": ("gamma",)},
    {"rank": 4}, {"rank": 8, "components": ("gamma", "psi")}, {"reduction": 4}, {"context": "bilinear"},
]


def _randomized(layer: PEDConv2d) -> PEDConv2d:
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "generator" in name or "bias" in name:
                param.normal_(0.0, 0.3)
    return layer.eval()


def _formula(layer: PEDConv2d, x: torch.Tensor) -> torch.Tensor:
    weights = layer.dynamic_weight(x)
    return torch.cat([F.conv2d(x[b : b + 1], weights[b], layer.bias, layer.stride, layer.padding, layer.dilation,
                               layer.groups) for b in range(x.shape[0])])


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_selectors_are_im2col(groups: int, stride: int, padding: int, dilation: int) -> None:
    torch.manual_seed(0)
    cin, kh, kw = 4, 3, 2
    x = torch.randn(2, cin, 7, 6, dtype=torch.float64)
    patches = F.unfold(x, (kh, kw), dilation, padding, stride)  # B x (C_in kh kw) x L, channel-major
    sel = tap_selector(cin, groups, (kh, kw), False, x)
    z = F.conv2d(x, sel, None, stride, padding, dilation, groups=cin)
    assert sel.shape == (cin * kh * kw, 1, kh, kw) and set(sel.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(z.flatten(2), patches, rtol=0, atol=0)
    # tap-major, per group: channel (j, t, c) of the copies is tap t of channel j * C_in/g + c
    copies = x.view(2, groups, 1, cin // groups, 7, 6).expand(2, groups, kh * kw, cin // groups, 7, 6)
    shifted = F.conv2d(copies.reshape(2, -1, 7, 6), tap_selector(cin, groups, (kh, kw), True, x), None, stride,
                       padding, dilation, groups=cin * kh * kw)
    expect = patches.view(2, groups, cin // groups, kh * kw, -1).transpose(2, 3).reshape(2, -1, patches.shape[-1])
    torch.testing.assert_close(shifted.flatten(2), expect, rtol=0, atol=0)


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_forms_equal_the_formula_in_float64(options: dict) -> None:
    torch.manual_seed(1)
    layer = _randomized(PEDConv2d(6, 8, 3, stride=2, padding=1, bias=True, **options)).double()
    x = torch.randn(3, 6, 9, 7, dtype=torch.float64)
    expected = _formula(layer, x)
    # without psi: the per-sample weight product or the one constant conv with channel scalings
    assert applicable_forms(layer) == (tuple(FORMS) if "psi" in layer.components else ("cols", "factored"))
    for form in applicable_forms(layer):
        layer.set_export_form(form)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12, msg=form)


@pytest.mark.parametrize("kernel, groups, stride", [(1, 1, 2), (3, 4, 1), (1, 2, 1)])
def test_cols_special_cases_equal_the_formula(kernel: int, groups: int, stride: int) -> None:
    """``cols`` on 1x1 kernels (no selector: the strided input is the patch matrix) and depthwise layers (a product and
    a sum over the taps instead of a matmul per channel)."""
    torch.manual_seed(3)
    layer = _randomized(PEDConv2d(4, 4, kernel, stride=stride, padding=kernel // 2, groups=groups, rank=2)).double()
    layer.set_export_form("cols")
    x = torch.randn(3, 4, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _formula(layer, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["cols", "expand", "shift"])
def test_forms_gradcheck(form: str) -> None:
    torch.manual_seed(2)
    layer = _randomized(PEDConv2d(4, 6, 3, padding=1, groups=2, rank=2, sampling="none")).double()
    layer.set_export_form(form)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp, w: layer(inp), (x, layer.weight), eps=1e-6, atol=1e-6)


def test_export_form_buffers_stay_out_of_the_state_dict() -> None:
    layer = PEDConv2d(4, 6, 3, padding=1)
    keys = set(layer.state_dict())
    layer.set_export_form("cols")
    assert SELECTOR_BUFFERS[False] in dict(layer.named_buffers()) and set(layer.state_dict()) == keys
    layer.set_export_form("shift")  # the other selector replaces it
    assert set(dict(layer.named_buffers())) == {SELECTOR_BUFFERS[True]} and layer.path == "shift"
    layer.set_export_form("factored")
    assert not dict(layer.named_buffers()) and set(layer.state_dict()) == keys
    one_by_one = PEDConv2d(4, 6, 1)
    assert applicable_forms(one_by_one) == ("cols", "factored")
    with pytest.raises(ValueError, match="export form 'shift' does not apply to this layer"):
        one_by_one.set_export_form("shift")
    assert applicable_forms(PEDConv2d(4, 6, 3, components=("gamma", "phi"))) == ("cols", "factored")


def test_form_rule_on_resnet18_shapes() -> None:
    """The measured rule (docs/deployment.md): cols on the 56x56 and 28x28 stages, expand at 14x14, shift at 7x7."""
    cases = [((64, 64, 1), 56, "cols"), ((64, 128, 2), 56, "cols"), ((128, 128, 1), 28, "cols"),
             ((128, 256, 2), 28, "expand"), ((256, 256, 1), 14, "expand"), ((256, 512, 2), 14, "shift"),
             ((512, 512, 1), 7, "shift")]
    for (cin, cout, stride), size, form in cases:
        layer = PEDConv2d(cin, cout, 3, stride=stride, padding=1)
        assert form_rule(layer, (1, cin, size, size)) == form, (cin, cout, stride, size)
    assert form_rule(PEDConv2d(64, 256, 1), (1, 64, 56, 56)) == "factored"
