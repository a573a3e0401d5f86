"""Placement policies select exactly the intended convs, on the zoo and on user-given CNNs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from image_classification.dynamic.base import DynamicConv2d
from image_classification.models import (
    LinearAsConv,
    build_model,
    conv_sites,
    convert_model,
    parse_placement,
    select_convs,
)


def _dynamic_names(model: nn.Module) -> list:
    return [n for n, m in model.named_modules() if isinstance(m, DynamicConv2d)]


def test_resnet18_paper_placement_is_the_authors_release() -> None:
    model = build_model("resnet18")
    names = select_convs(model, "paper")
    expected = [f"layer{s}.{b}.conv{c}" for s in range(1, 5) for b in range(2) for c in (1, 2)]
    assert names == expected  # stem, 1x1 downsample convs and fc stay static
    assert select_convs(model, "all") == sorted(
        expected + ["layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"],
        key=[s.name for s in conv_sites(model)].index)
    converted = build_model("resnet18", "pedconv")
    assert _dynamic_names(converted) == expected
    assert type(converted.conv1) is nn.Conv2d and type(converted.fc) is nn.Linear
    assert type(converted.layer2[0].downsample[0]) is nn.Conv2d


def test_resnet50_pointwise_and_full() -> None:
    model = build_model("resnet50")
    pw = select_convs(model, "pointwise")
    assert len(pw) == 32 and all(n.endswith(("conv1", "conv3")) for n in pw)
    full = select_convs(model, "full")
    assert len(full) == 16 and all(n.endswith("conv2") for n in full)


def test_mobilenet_v1_types_and_depth_halves() -> None:
    model = build_model("mobilenet_v1")
    dw = select_convs(model, "depthwise")
    pw = select_convs(model, "pointwise")
    assert dw == [f"features.{i}.dw.0" for i in range(1, 14)]
    assert pw == [f"features.{i}.pw.0" for i in range(1, 14)]
    assert select_convs(model, "pointwise+depthwise") == select_convs(model, "paper")
    # halves over the 13 depthwise-separable blocks: the first 6 are shallow (Table 5d)
    shallow = select_convs(model, "shallow")
    deep = select_convs(model, "deep")
    assert shallow == [f"features.{i}.{p}.0" for i in range(1, 7) for p in ("dw", "pw")]
    assert deep == [f"features.{i}.{p}.0" for i in range(7, 14) for p in ("dw", "pw")]
    assert select_convs(model, "deep+pointwise") == [f"features.{i}.pw.0" for i in range(7, 14)]
    assert select_convs(model, "paper+stem")[0] == "features.0.0"


def test_efficientnet_squeeze_excitation_and_classifier() -> None:
    model = build_model("efficientnet_b0")
    sites = conv_sites(model)
    se = [s.name for s in sites if s.kind == "se"]
    assert len(se) == 32 and all(".fc1" in n or ".fc2" in n for n in se)
    paper = select_convs(model, "paper")
    assert not set(se) & set(paper) and len(paper) == 48
    assert set(select_convs(model, "paper+se")) == set(paper) | set(se)
    model = build_model("efficientnet_b0", "pedconv", "paper+se+cls", num_classes=10)
    assert isinstance(model.classifier[1], LinearAsConv)
    assert isinstance(model.features[1][0].block[1].fc1, DynamicConv2d)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_dcd_classifier_uses_dcdlinear() -> None:
    model = build_model("mobilenet_v2", "dcd", "pointwise+cls", num_classes=10, width_mult=0.35)
    assert type(model.classifier[1]).__name__ == "DCDLinear"
    assert model.dynamic_convs[-1] == "classifier.1"
    assert not any(isinstance(m, DynamicConv2d) and m.groups > 1 for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    only_cls = build_model("mobilenet_v2", "dcd", "none+cls", num_classes=10, width_mult=0.35)
    assert only_cls.dynamic_convs == ["classifier.1"]


def test_share_groups_generators_per_residual_block() -> None:
    model = build_model("resnet18", "pedconv", "paper+share", num_classes=10)
    assert model.layer1[0].conv1.generator is not None and model.layer1[0].conv2.generator is None
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_placement_strings_roundtrip_and_errors() -> None:
    assert str(parse_placement("paper")) == "paper"
    assert str(parse_placement("cls+pointwise")) == "pointwise+cls"
    assert str(parse_placement("DEEP + se")) == "deep+se"
    with pytest.raises(ValueError, match="valid tokens: paper, all, none"):
        parse_placement("everywhere")
    with pytest.raises(ValueError, match="more than one"):
        parse_placement("paper+all")


def test_user_sequential_and_detection_backbone() -> None:
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                        nn.Conv2d(8, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    convert_model(seq, "pedconv", "paper")
    assert seq.dynamic_convs == ["2", "3"] and type(seq[0]) is nn.Conv2d
    assert seq(torch.randn(2, 3, 12, 12)).shape == (2, 4)

    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
    before = backbone.body.layer3[0].conv1.weight.detach().clone()
    convert_model(backbone, "pedconv", "paper")
    assert isinstance(backbone.body.layer3[0].conv1, DynamicConv2d)
    assert type(backbone.body.conv1) is nn.Conv2d
    assert type(backbone.body.layer3[0].downsample[0]) is nn.Conv2d
    torch.testing.assert_close(backbone.body.layer3[0].conv1.weight, before)
    feats = backbone(torch.randn(1, 3, 64, 64))
    assert set(feats) == {"0", "1", "2", "3", "pool"}


def test_static_conversion_changes_nothing_and_is_idempotent() -> None:
    model = torchvision.models.resnet18()
    convert_model(model, "static", "paper")
    assert not _dynamic_names(model)
    model = build_model("resnet10", "pedconv")
    n = len(_dynamic_names(model))
    convert_model(model, "pedconv", "paper")  # already dynamic convs are not entered again
    assert len(_dynamic_names(model)) == n


def test_last_keeps_one_full_conv_per_block() -> None:
    """RedNet's place for Involution: the 3x3 of each bottleneck, the second conv of each basic block."""
    from image_classification.models import build_model

    basic = build_model("cifar_resnet20", "static", num_classes=10)
    chosen = select_convs(basic, "paper+last")
    assert len(chosen) == 9 and all(name.endswith(".conv2") for name in chosen)
    bottleneck = build_model("resnet50", "static", num_classes=10)
    chosen = select_convs(bottleneck, "paper+last")
    assert len(chosen) == 16 and all(name.endswith(".conv2") for name in chosen)  # the 3x3 of each block
    assert str(parse_placement("last+paper")) == "paper+last"


def test_inblock_leaves_out_convs_between_blocks() -> None:
    model = build_model("efficientnet_b0")
    deep = select_convs(model, "deep")
    assert "features.8.0" in deep  # the 1x1 head conv belongs to the deep half
    inblock = select_convs(model, "deep+inblock")
    assert inblock == [n for n in deep if n != "features.8.0"]
    assert len(inblock) == 24 and all(n.startswith(("features.5.", "features.6.", "features.7.")) for n in inblock)
    assert str(parse_placement("inblock+deep")) == "deep+inblock"
    v2 = build_model("mobilenet_v2")
    assert set(select_convs(v2, "pointwise")) - set(select_convs(v2, "pointwise+inblock")) == {"features.18.0"}


def test_condconv_block_routing_placement_on_efficientnet() -> None:
    model = build_model("efficientnet_b0", "condconv:k=4,routing=block", "deep+inblock", num_classes=10)
    routed = [n for n, m in model.named_modules() if n.endswith("condconv_routing")]
    assert routed == [f"features.{s}.{b}.condconv_routing" for s, n in ((5, 3), (6, 4), (7, 1)) for b in range(n)]
    assert model.features[5][0].condconv_routing.fc.in_features == 80  # the block input, not the expansion
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_dcd_released_placement_follows_the_release() -> None:
    r18 = build_model("resnet18", "dcd:variant=released", "paper+cls", num_classes=10)
    assert {m.sizing for m in r18.modules() if isinstance(m, DynamicConv2d)} == {"resnet_basic"}
    assert r18.layer1[0].conv1.pool == 2 and r18.fc.variant == "released"
    r50 = build_model("resnet50", "dcd:variant=released", "paper", num_classes=10)
    assert {m.sizing for m in r50.modules() if isinstance(m, DynamicConv2d)} == {"resnet_bottleneck"}
    assert (r50.layer4[0].conv2.pool, r50.layer4[2].conv1.latent) == (1, 45)  # global context, floor(sqrt(2048))
    v2 = build_model("mobilenet_v2", "dcd:variant=released", "pointwise+inblock+cls", num_classes=10, width_mult=0.5)
    assert "features.1.conv.1" not in v2.dynamic_convs  # the release's expansion-1 block is static
    assert {m.sizing for m in v2.modules() if isinstance(m, DynamicConv2d)} == {"mobilenetv2"}
    assert v2.features[2].conv[0][0].pool == 2 and v2.features[2].conv[2].pool == 1  # expand / project
    # the ResNet dropout hook (set_classifier_dropout) follows the classifier when +cls replaces it
    drop = build_model("resnet18", "dcd:variant=released", "paper+cls", num_classes=10, dropout=0.5)
    assert len(drop.fc._forward_pre_hooks) == 1
