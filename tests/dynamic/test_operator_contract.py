"""The operator contract, checked once for every registered operator (``list_operators()``).

Every operator is a drop-in for nn.Conv2d (shape, dtype), its execution paths equal the per-sample
reference of its equation where it exposes one (``dynamic_weight``), its gradients pass gradcheck,
its MAC count equals a hand formula written out below, its state dict round-trips and its spec
strings parse and print back. An operator added to the registry without a hand MAC formula here
fails :func:`test_every_operator_has_a_hand_mac_formula`. Operator-specific behaviour (more
geometries, schedules, layouts) stays in the operator's own test file.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from image_classification.dynamic import OPERATORS, build_conv, list_operators, parse_spec
from image_classification.dynamic.protocol import OperatorProtocol
from image_classification.measurement.macs import count_macs

OPERATOR_NAMES = list(list_operators())
#: options that make the tiny contract geometry valid (Involution: C_in divisible by group_channels)
SMALL = {"involution": {"group_channels": 4}}
C_IN, C_OUT, K, SIZE = 8, 12, 3, 6


def _build(name: str, c_in: int = C_IN, c_out: int = C_OUT, **kw: Any) -> nn.Module:
    options = {**SMALL.get(name, {}), **kw}
    return build_conv(name, c_in, c_out, K, padding=1, bias=True, **options)


def _reference(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-sample F.conv2d with the operator's own ``dynamic_weight(x)`` (and ``dynamic_bias`` / ``bias``)."""
    weight = m.dynamic_weight(x)
    bias_fn = getattr(m, "dynamic_bias", None)
    bias = bias_fn(x) if callable(bias_fn) else None
    outs = []
    for b in range(x.shape[0]):
        bb = bias[b] if bias is not None else m.bias
        outs.append(F.conv2d(x[b:b + 1], weight[b], bb, m.stride, m.padding, m.dilation, m.groups))
    return torch.cat(outs)


def _has_per_sample_weight(m: nn.Module, x: torch.Tensor) -> bool:
    fn = getattr(m, "dynamic_weight", None)
    if not callable(fn):
        return False
    with torch.no_grad():
        return fn(x).dim() == 5  # B x C_out x C_in/g x kh x kw (spatial PEDConv's is per location)


#: paths that cannot run this test's float64 layers: checked against ``reference`` in float32/16 by their own
#: tests (triton: tests/dynamic/pedconv/test_triton_path.py)
FLOAT32_ONLY_PATHS = {"triton"}


def _paths(name: str):
    option = OPERATORS[name].options.get("path")
    choices = option.choices if option is not None else ()
    return [p for p in choices if p != "auto" and p not in FLOAT32_ONLY_PATHS] or [None]


@pytest.mark.parametrize("name", OPERATOR_NAMES)
def test_registered_class_carries_the_protocol(name: str) -> None:
    cls = OPERATORS[name].cls
    assert issubclass(cls, nn.Module) and issubclass(cls, OperatorProtocol)
    assert cls.default_bn_gamma is None or isinstance(cls.default_bn_gamma, float)
    for layout in cls.foreign_layouts:
        assert layout.detect({"conv.weight": torch.zeros(1)}) is False  # a plain state dict is never foreign


@pytest.mark.parametrize("name", OPERATOR_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_drop_in_shape_and_dtype(name: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    for stride, dilation in ((1, 1), (2, 1), (1, 2)):
        m = build_conv(name, C_IN, C_OUT, K, stride=stride, padding=1, dilation=dilation, **SMALL.get(name, {}))
        m = m.to(dtype)
        ref = nn.Conv2d(C_IN, C_OUT, K, stride=stride, padding=1, dilation=dilation)
        x = torch.randn(2, C_IN, 7, 7, dtype=dtype)
        for train in (True, False):
            m.train(train)
            y = m(x)
            assert y.shape == ref(x.float()).shape and y.dtype == dtype, (stride, dilation, train)


@pytest.mark.parametrize("name", OPERATOR_NAMES)
def test_every_path_equals_the_per_sample_reference(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, C_IN, SIZE, SIZE, dtype=torch.float64)
    probe = _build(name).double().eval()
    if not _has_per_sample_weight(probe, x):
        pytest.skip(f"{name} has no per-sample weight (its own test file checks its equation)")
    for path in _paths(name):
        torch.manual_seed(1)
        m = _build(name, **({} if path is None else {"path": path})).double().eval()
        with torch.no_grad():
            expected = _reference(m, x)
            torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10, msg=f"{name} path {path}")


@pytest.mark.parametrize("name", OPERATOR_NAMES)
def test_gradcheck_train_and_eval(name: str) -> None:
    torch.manual_seed(0)
    m = build_conv(name, 4, 4, K, padding=1, **({"group_channels": 2} if name == "involution" else {})).double()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)

    def seeded(inp: torch.Tensor) -> torch.Tensor:  # the training noise is the same on every call
        torch.manual_seed(2)
        return m(inp)

    for train in (True, False):
        m.train(train)
        assert torch.autograd.gradcheck(seeded, (x,), eps=1e-6, atol=1e-5, fast_mode=True), (name, train)


# --------------------------------------------------------------------------------------------- MACs
def _conv(m: nn.Module) -> int:
    return SIZE * SIZE * m.out_channels * (m.in_channels // m.groups) * K * K


def _weight(m: nn.Module) -> int:
    return m.out_channels * (m.in_channels // m.groups) * K * K


def _hand_pedconv(m: nn.Module) -> int:
    h = max(4, C_IN // 16)  # generator bottleneck, PEDConv Eq. 7
    return _conv(m) + C_IN * h + h * (C_OUT + C_IN + K * K) + 2 * _weight(m)


def _hand_spatial(m: nn.Module) -> int:
    h = max(4, C_IN // 16)
    return _conv(m) + SIZE * SIZE * (C_IN * h + h * (C_OUT + C_IN + K * K))


def _hand_dcd(m: nn.Module) -> int:
    # DCD Eq. 6, 3x3 channel fusion: 2x2 pooled context (4 C_in), L = floor(sqrt(4 C_in)) = 5,
    # s = max(4, 4 C_in // 16) = 4; W0 conv + dynamic branch FC(4 C_in -> s), FC(s -> C_out + L^2)
    # + synthesis of P Phi Q^T: L^2 C_in + C_out L C_in
    L, s, ctx = 5, 4, 4 * C_IN
    assert (m.latent, m.hidden) == (L, s)
    return _conv(m) + ctx * s + s * (C_OUT + L * L) + L * L * C_IN + C_OUT * L * C_IN


def _hand_dyconv(m: nn.Module) -> int:
    h = max(4, C_IN // 4)  # DY-Conv attention FC(C_in -> h) -> FC(h -> K=4)
    return _conv(m) + 4 * _weight(m) + C_IN * h + h * 4


def _hand_condconv(m: nn.Module) -> int:
    return _conv(m) + 8 * _weight(m) + C_IN * 8  # 8 experts, routing FC(C_in -> 8)


def _hand_involution(m: nn.Module) -> int:
    mid, groups = C_IN // 4, C_IN // 4  # reduction 4; group_channels 4 -> 2 kernel groups
    per_pixel = C_IN * mid + mid * K * K * groups + C_IN * K * K + C_IN * C_OUT  # W_0, W_1, Eq. 4, projection
    return SIZE * SIZE * per_pixel


def _hand_odconv(m: nn.Module) -> int:
    h = 16  # max(int(C_in * 1/16), 16)
    heads = C_IN + C_OUT + K * K  # channel, filter, spatial attention (n = 1: no kernel attention)
    return _conv(m) + C_IN * h + h * heads + 2 * _weight(m)


def _hand_static(m: nn.Module) -> int:
    return _conv(m)


HAND_MACS: Dict[str, Callable[[nn.Module], int]] = {
    "pedconv": _hand_pedconv,
    "pedconv_spatial": _hand_spatial,
    "dcd": _hand_dcd,
    "dyconv": _hand_dyconv,
    "condconv": _hand_condconv,
    "involution": _hand_involution,
    "odconv": _hand_odconv,
    "static": _hand_static,
}


def test_every_operator_has_a_hand_mac_formula() -> None:
    assert set(HAND_MACS) == set(OPERATOR_NAMES)


@pytest.mark.parametrize("name", OPERATOR_NAMES)
def test_macs_equal_the_hand_formula(name: str) -> None:
    m = _build(name)
    counted = count_macs(nn.Sequential(m), SIZE, in_chans=C_IN).total
    assert counted == HAND_MACS[name](m)
    if callable(getattr(m, "macs", None)):
        assert m.macs((2, C_IN, SIZE, SIZE)) == 2 * counted  # linear in the batch


def test_involution_is_not_charged_a_dense_conv() -> None:
    """One 64->64 3x3 layer at 14 px: static 7,225,344 MACs; Involution runs 426,496 (Eq. 3-4)."""
    static = count_macs(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1)), 14, in_chans=64).total
    inv = count_macs(nn.Sequential(build_conv("involution", 64, 64, 3, padding=1)), 14, in_chans=64).total
    assert static == 7_225_344
    assert inv == 14 * 14 * (64 * 16 + 16 * 9 * 4 + 64 * 9) == 426_496


# --------------------------------------------------------------------------------- state and specs
@pytest.mark.parametrize("name", OPERATOR_NAMES)
def test_state_dict_round_trip(name: str) -> None:
    torch.manual_seed(0)
    a = _build(name)
    a(torch.randn(4, C_IN, SIZE, SIZE))  # running statistics of inner BatchNorms move
    torch.manual_seed(1)
    b = _build(name)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(2, C_IN, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
        torch.testing.assert_close(b(x)[1:], a(x[1:]), rtol=1e-5, atol=1e-5)  # per-sample independent


@pytest.mark.parametrize("name", OPERATOR_NAMES)
def test_spec_parsing_round_trips(name: str) -> None:
    spec = parse_spec(name)
    assert spec.name == name and str(spec) == name
    entry = OPERATORS[name]
    for key, option in entry.options.items():
        option.check(name, key, option.default)
        assert spec.options[key] == option.default
    with pytest.raises(ValueError, match=f"unknown option 'no_such_option' for operator '{name}'"):
        parse_spec(f"{name}:no_such_option=1")
    for key, option in entry.options.items():  # one non-default value per option prints and parses back
        if option.choices and option.type != "set":
            value: Any = next(c for c in option.choices if c != option.default)
        elif option.type == "set":
            value = option.default[:1]
        elif option.type is bool:
            value = not option.default
        elif option.type is int:
            value = option.default + 2
        elif option.type is float:
            value = option.default * 2 + 0.5
        else:
            continue
        changed = parse_spec(name, **{key: value})
        assert parse_spec(str(changed)) == changed, (name, key)


def _bad_values(option: Any) -> list:
    """Constructor arguments each registered Option must refuse."""
    if option.type == "set":
        return [(), ("nonsense",)]
    if option.choices is not None:
        return ["nonsense"]
    bad: list = ["3"] if option.type in (int, float) else ["yes"]
    if option.type is int:
        bad.append(1.5)
    if option.minimum is not None:
        bad.append(option.minimum - 1)
    return bad


@pytest.mark.parametrize("name", list_operators())
def test_constructors_check_their_registered_options(name: str) -> None:
    """Every operator validates its constructor arguments through the registered Options (one helper on the
    base, :meth:`DynamicConv2d.check_options`): a bad value gets the same one-line message as in a spec string."""
    entry = OPERATORS[name]
    for key, option in entry.options.items():
        for value in _bad_values(option):
            with pytest.raises(ValueError, match=f"option '{key}' of operator '{name}'"):
                entry.cls(8, 8, 3, **{key: value})
