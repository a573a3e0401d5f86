"""SSD300-ResNet in torchvision's detection API: the paper's counts (Table 2), feature maps, outputs, errors."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.ssd import SSD

from image_classification.detection import build_ssd300
from image_classification.detection.ssd import feature_sizes
from image_classification.dynamic.pedconv import PEDConv2d
from image_classification.measurement.macs import count_params
from image_classification.measurement.paper_tables import detector_macs


@pytest.mark.slow
@pytest.mark.parametrize("conv,parts,paper_params,paper_gmacs,ours_gmacs", [
    ("static", None, 22.9, 20.2, 20.151),
    ("pedconv", None, 24.4, 20.3, 20.176),  # -0.6 % MACs, as PEDConv ResNet-50's 4.13G vs the printed 4.2G
])
def test_paper_counts(conv: str, parts, paper_params: float, paper_gmacs: float, ours_gmacs: float) -> None:
    model = build_ssd300(conv, dynamic_parts=parts)
    assert isinstance(model, SSD)
    assert abs(count_params(model).deploy / 1e6 - paper_params) <= 0.05
    gmacs = detector_macs(model) / 1e9
    assert gmacs == pytest.approx(ours_gmacs, abs=0.01) and abs(gmacs - paper_gmacs) / paper_gmacs < 0.007
    assert feature_sizes(model) == [38, 19, 10, 5, 3, 1]


def test_trunk_only_pedconv_count_and_dynamic_layers() -> None:
    trunk_only = build_ssd300("pedconv", dynamic_parts=())
    assert count_params(trunk_only).deploy / 1e6 == pytest.approx(24.107, abs=0.001)
    model = build_ssd300("pedconv")
    assert isinstance(model.backbone.extras[0][3], PEDConv2d) and not isinstance(model.head.classification_head
                                                                                  .module_list[0], PEDConv2d)
    assert "backbone.trunk.layer3.0.conv2" in model.dynamic_convs
    assert model.backbone.trunk.layer3[0].conv2.stride == (1, 1)
    assert not any("downsample" in name for name in model.dynamic_convs)  # trunk placement 'paper'


@pytest.mark.slow
def test_training_losses_and_detections_small_backbone() -> None:
    torch.manual_seed(0)
    model = build_ssd300("pedconv", backbone="resnet18", num_classes=4, size=257).train()
    images = [torch.rand(3, 257, 257), torch.rand(3, 200, 240)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 100.0, 200.0]]), "labels": torch.tensor([3])},
               {"boxes": torch.tensor([[5.0, 5.0, 50.0, 60.0]]), "labels": torch.tensor([1])}]
    losses = model(images, targets)
    assert set(losses) == {"bbox_regression", "classification"} and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    assert (out[1]["boxes"][:, 2] <= 240 + 1e-3).all()  # mapped back to the original image size


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least 257 px"):
        build_ssd300(size=200)
    with pytest.raises(ValueError, match="num_classes"):
        build_ssd300(num_classes=1)
    with pytest.raises(ValueError, match="unknown SSD backbone part 'heads'; valid parts: extras"):
        build_ssd300("pedconv", dynamic_parts=("heads",))
    with pytest.raises(ValueError, match="unknown backbone"):
        build_ssd300(backbone="vgg16")
