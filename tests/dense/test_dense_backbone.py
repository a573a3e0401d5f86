"""ResNet trunks for dense tasks: dilation equals torchvision's, head conversion, checkpoint loading, schedules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torchvision.models import resnet50

from image_classification.dense.backbone import build_resnet_trunk, convert_parts, dilate_stage
from image_classification.dense.engine import IterationSchedule
from image_classification.dynamic.pedconv import PEDConv2d
from image_classification.models import build_model
from image_classification.training.checkpoint import CheckpointError, save_checkpoint


def test_dilated_trunk_is_torchvisions_dilated_resnet50() -> None:
    torch.manual_seed(0)
    ref = resnet50(replace_stride_with_dilation=[False, True, True]).eval()
    trunk = build_resnet_trunk("resnet50", dilate=(False, True, True), return_layers=("layer3", "layer4")).eval()
    trunk.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("fc")})
    for name, module in ref.named_modules():
        if isinstance(module, nn.Conv2d):
            ours = trunk.get_submodule(name)
            assert (ours.stride, ours.dilation, ours.padding) == (module.stride, module.dilation, module.padding), name
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        out = trunk(x)
        y = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
    assert list(out) == ["layer3", "layer4"] and out["layer4"].shape[-1] == 6  # output stride 8
    torch.testing.assert_close(out["layer4"], y)


def test_dilation_works_on_basicblocks_and_dynamic_convs() -> None:
    trunk = build_resnet_trunk("resnet18", "pedconv", "all", dilate=(False, True, True)).eval()
    convs = [m for m in trunk.layer4.modules() if isinstance(m, PEDConv2d)]
    assert convs and all(m.stride == (1, 1) for m in convs)
    assert {m.dilation for m in convs if m.kernel_size == (3, 3)} == {(2, 2), (4, 4)}
    with torch.no_grad():
        out = trunk(torch.randn(2, 3, 32, 32))
    assert out["layer4"].shape == (2, 512, 4, 4)


def test_dilate_stage_is_exact_for_a_pedconv_layer() -> None:
    """A dilated PEDConv stage computes what nn.Conv2d with the same dilation/padding would with its weight."""
    torch.manual_seed(1)
    stage = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=1))
    dilate_stage(stage, 4)
    assert [(m.stride, m.dilation, m.padding) for m in stage] == [((1, 1), (2, 2), (2, 2)), ((1, 1), (4, 4), (4, 4))]


def test_convert_parts() -> None:
    model = nn.Sequential()
    model.add_module("head", nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()))
    model.add_module("cls", nn.Conv2d(8, 3, 1))
    assert convert_parts(model, "static", ["head"]) == []
    assert convert_parts(model, "pedconv", ["head", "cls"]) == ["head.0", "cls"]
    assert isinstance(model.head[0], PEDConv2d) and isinstance(model.cls, PEDConv2d)
    with pytest.raises(ValueError, match="unknown model part 'nope'; valid parts: head, cls"):
        convert_parts(model, "pedconv", ["nope"])


def test_trunk_loads_an_imagenet_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(2)
    net = build_model("resnet18", "pedconv", "paper", num_classes=10)
    save_checkpoint({"arch": "resnet18", "conv": "pedconv", "state_dict": net.state_dict()}, tmp_path, "r18.pth.tar")
    # placement 'all' has shortcut generators the 'paper' checkpoint lacks: they keep their initialisation
    trunk = build_resnet_trunk("resnet18", "pedconv", "all", pretrained=str(tmp_path / "r18.pth.tar"))
    torch.testing.assert_close(trunk.layer3[0].conv1.weight, net.layer3[0].conv1.weight)
    torch.testing.assert_close(trunk.layer2[0].downsample[0].weight, net.layer2[0].downsample[0].weight)
    with pytest.raises(CheckpointError, match="arch resnet18"):
        build_resnet_trunk("resnet34", "pedconv", pretrained=str(tmp_path / "r18.pth.tar"))
    with pytest.raises(CheckpointError, match="operator"):
        build_resnet_trunk("resnet18", "static", pretrained=str(tmp_path / "r18.pth.tar"))
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        build_resnet_trunk("vgg16")


def test_iteration_schedules() -> None:
    step = IterationSchedule("step", 240, warmup=0, milestones=[160, 200])
    assert [step(t) for t in (0, 159, 160, 199, 200, 239)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    poly = IterationSchedule("poly", 100, warmup=10, power=0.9)
    assert poly(0) == pytest.approx(0.1 * 1.0) and poly(50) == pytest.approx(0.5 ** 0.9)
    assert poly(100) == 0.0
    with pytest.raises(ValueError, match="unknown lr schedule"):
        IterationSchedule("cosine", 10)
