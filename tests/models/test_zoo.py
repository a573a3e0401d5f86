"""Every architecture builds with every operator and trains one step on a tiny input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from image_classification.dynamic import infomax_loss, list_operators
from image_classification.dynamic.base import DynamicConv2d
from image_classification.measurement.macs import count_params
from image_classification.models import ARCHS, INITS, build_model, list_archs

# heavy architectures are exercised at reduced width / depth where the definition allows it
_SMALL = {"mobilenet_v1": {"width_mult": 0.25}, "mobilenet_v2": {"width_mult": 0.35}}
_OPERATORS = [op for op in list_operators() if op != "static"]


def _fwd_bwd(model: nn.Module, in_chans: int = 3, size: int = 32, classes: int = 10) -> None:
    model.train()
    x = torch.randn(2, in_chans, size, size)
    out = model(x)
    assert out.shape == (2, classes)
    loss = out.square().mean()
    extra = infomax_loss(model)
    if extra is not None:
        loss = loss + 1e-3 * extra
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_registry_lists_every_paper_architecture() -> None:
    expected = {"resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v1_x0.25",
                "mobilenet_v1_x0.5", "mobilenet_v1_x0.75", "mobilenet_v1_x1.0", "mobilenet_v2_x0.35",
                "mobilenet_v2_x0.5", "mobilenet_v2_x1.0", "efficientnet_b0", "cifar_resnet20", "cifar_resnet56",
                "resnet18_small"}
    assert expected <= set(list_archs())


@pytest.mark.parametrize("arch", list_archs())
def test_every_arch_static_any_size_channels_classes(arch: str) -> None:
    kw = _SMALL.get(arch, {})
    model = build_model(arch, num_classes=10, in_chans=1, **kw)
    # Fashion-MNIST shape: no arch assumes 224
    _fwd_bwd(model, in_chans=1, size=28 if "cifar" in arch or "small" in arch else 40)


@pytest.mark.parametrize("op", _OPERATORS)
@pytest.mark.parametrize("arch", ["cifar_resnet20", "mobilenet_v1", "mobilenet_v2"])
def test_every_operator_trains(arch: str, op: str) -> None:
    """Every operator on a residual net, a depthwise-separable net and an inverted-residual net."""
    torch.manual_seed(0)
    kw = {"mobilenet_v1": {"width_mult": 0.5}, "mobilenet_v2": {"width_mult": 0.35}}.get(arch, {})
    spec = "involution:group_channels=8" if op == "involution" else op  # x0.35 has 8-channel layers
    model = build_model(arch, spec, num_classes=10, **kw)
    n_dyn = sum(isinstance(m, DynamicConv2d) for m in model.modules())
    assert n_dyn == len(model.dynamic_convs) > 0
    _fwd_bwd(model, size=16 if arch == "cifar_resnet20" else 24)


@pytest.mark.parametrize("op", ["pedconv", "dcd"])
@pytest.mark.parametrize("arch", ["resnet10", "efficientnet_b0"])
def test_torchvision_archs_train_dynamic(arch: str, op: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, op, num_classes=10)
    assert len(model.dynamic_convs) == {"resnet10": 8, "efficientnet_b0": 48}[arch]
    _fwd_bwd(model, size=32)


def test_deep_archs_build_with_pedconv() -> None:
    for arch in ("resnet34", "resnet101", "cifar_resnet56"):
        model = build_model(arch, "pedconv", num_classes=10)
        assert len(model.dynamic_convs) == {"resnet34": 32, "resnet101": 99, "cifar_resnet56": 54}[arch]


def test_static_weights_load_from_torchvision_and_become_base_weights() -> None:
    reference = torchvision.models.resnet18()
    model = build_model("resnet18")
    model.load_state_dict(reference.state_dict())  # torchvision's static checkpoints load unchanged
    dynamic = build_model("resnet18", "pedconv")
    static = build_model("resnet18")
    static.load_state_dict(reference.state_dict())
    from image_classification.models import convert_model
    convert_model(static, "pedconv")
    torch.testing.assert_close(static.layer2[0].conv1.weight, reference.layer2[0].conv1.weight)
    assert type(static.layer2[0].conv1) is type(dynamic.layer2[0].conv1)


def test_widths_and_small_variants() -> None:
    assert count_params(build_model("mobilenet_v1_x1.0")).deploy == 4231976
    assert count_params(build_model("mobilenet_v1", width_mult=0.5)).deploy == count_params(
        build_model("mobilenet_v1_x0.5")).deploy
    small = build_model("resnet18_small", num_classes=10)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert round(count_params(build_model("cifar_resnet20", num_classes=10)).deploy / 1e6, 2) == 0.27
    assert round(count_params(build_model("cifar_resnet56", num_classes=10)).deploy / 1e6, 2) == 0.85
    assert ARCHS["cifar_resnet20"].image_size == 32


@pytest.mark.parametrize("init", INITS)
def test_init_schemes(init: str) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", init=init)
    w = model.layer3[0].conv1.weight  # 128 -> 256, 3x3
    fan = {"fanin": 128 * 9, "fanout": 256 * 9, "classic": 256 * 9}[init]  # torchvision ResNet: fan_out
    assert abs(w.std().item() - (2 / fan) ** 0.5) < 0.1 * (2 / fan) ** 0.5
    assert torch.all(model.layer3[0].bn1.weight == 1)


def test_pedconv_keeps_authors_bn_gamma_and_generator_init() -> None:
    model = build_model("resnet18", "pedconv")
    assert torch.all(model.layer1[0].bn1.weight == 0.5)  # authors' release: every BN gamma 0.5
    assert torch.all(build_model("resnet18", "pedconv", bn_gamma=None).layer1[0].bn1.weight == 1)
    assert torch.all(build_model("resnet18", "static").layer1[0].bn1.weight == 1)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: build_model("resnet19"), "unknown arch 'resnet19'; valid archs: .*resnet18"),
        (lambda: build_model("resnet18", "pedkonv"), "unknown operator 'pedkonv'; valid operators"),
        (lambda: build_model("resnet18", "pedconv:rank=0"), "rank"),
        (lambda: build_model("resnet18", placement="middle"), "unknown placement token 'middle'.*valid tokens"),
        (lambda: build_model("resnet18", placement="shallow+deep"), "both shallow and deep"),
        (lambda: build_model("resnet18", placement="none+pointwise"), "'none' cannot be combined"),
        (lambda: build_model("resnet18", "dcd", placement="paper+share"), "pedconv only"),
        (lambda: build_model("resnet18", init="xavier"), "unknown init 'xavier'; valid: classic, fanin, fanout"),
        (lambda: build_model("resnet18", num_classes=0), "num_classes must be a positive integer"),
        (lambda: build_model("resnet18", in_chans=-1), "in_chans must be a positive integer"),
        (lambda: build_model("mobilenet_v1", width_mult=0), "width_mult must be a positive number"),
        (lambda: build_model("resnet18", colour=True), "bad keyword for arch 'resnet18'"),
    ],
)
def test_bad_input_one_line_value_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_classifier_dropout_keeps_parameter_names():
    import torch

    from image_classification.models import build_model

    plain = build_model("cifar_resnet20", num_classes=10, in_chans=1)
    dropped = build_model("cifar_resnet20", num_classes=10, in_chans=1, dropout=0.5)
    assert list(plain.state_dict()) == list(dropped.state_dict())
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(4, 1, 28, 28)
    torch.manual_seed(0)
    dropped.train()
    assert not torch.equal(dropped(x), dropped(x))  # dropout active in training
    dropped.load_state_dict(plain.state_dict())  # undo the BN statistics of those training forwards
    dropped.eval()
    plain.eval()
    assert torch.equal(dropped(x), plain(x))  # and off in evaluation
    mbv2 = build_model("mobilenet_v2_x0.35", num_classes=10, dropout=0.1)
    assert [m.p for m in mbv2.modules() if isinstance(m, torch.nn.Dropout)] == [0.1]
    with pytest.raises(ValueError, match="dropout"):
        build_model("cifar_resnet20", dropout=1.5)
