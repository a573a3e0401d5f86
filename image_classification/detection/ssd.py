"""SSD300 with a (PEDConv) ResNet backbone in torchvision's detection API (PEDConv Table 2).

The detector is :class:`torchvision.models.detection.SSD` (its box coder, matcher, hard-negative mining,
losses, transform and post-processing) with the ResNet-50 SSD300 configuration of NVIDIA's
DeepLearningExamples (the framework of this project; the paper does not describe its detector further):

* backbone: the ResNet trunk up to ``layer3`` (conv4_x), with layer3's first block at stride 1, so the first
  feature map is 38 x 38 at 300 px (stride 8, 1024 channels for ResNet-50);
* five extra blocks (1x1 conv -> BN -> ReLU -> 3x3 conv -> BN -> ReLU; 3x3 stride 2 padding 1 for the first
  three, stride 1 padding 0 for the last two), channels 1024 -> 512 -> 512 -> 256 -> 256 -> 256 through
  bottlenecks 256, 256, 128, 128, 128: maps 38, 19, 10, 5, 3, 1;
* default boxes: 4, 6, 6, 6, 4, 4 per location (aspect ratios {2}, {2, 3}, ...), scales 0.07 .. 1.05, steps
  8, 16, 32, 64, 100, 300 (the SSD paper's COCO settings); heads: one 3x3 conv per map for box offsets and
  one for the 81 class scores (80 COCO categories + background).

Counts at 300 x 300 (deploy parameters; MACs of backbone + heads): static 22.89M / 20.15G (paper 22.9M /
20.2G); PEDConv 24.40M / 20.18G (paper 24.4M / 20.3G) with the trunk at placement ``paper`` (stem and
shortcuts static) and every conv of the extra blocks dynamic, heads static (:data:`PAPER_DYNAMIC_PARTS`);
PEDConv in the trunk only gives 24.11M. The MACs differ by -0.6 % as PEDConv ResNet-50's (4.13G vs the
printed 4.2G, docs/counts.md). Asserted in ``tests/detection/test_ssd.py``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDHead

from image_classification.data import IMAGENET_MEAN, IMAGENET_STD
from image_classification.dense.backbone import build_resnet_trunk, convert_parts, stage_channels
from image_classification.dynamic.base import DynamicConv2d
from image_classification.dynamic.registry import parse_spec
from image_classification.models.convert import record_build

__all__ = ["SSDResNetBackbone", "PAPER_DYNAMIC_PARTS", "build_ssd300", "DetectorFeatures", "COCO_NUM_CLASSES"]

COCO_NUM_CLASSES = 81  # 80 categories + background
EXTRA_CHANNELS = (512, 512, 256, 256, 256)
EXTRA_MIDDLE = (256, 256, 128, 128, 128)
ANCHOR_RATIOS = ([2], [2, 3], [2, 3], [2, 3], [2], [2])
ANCHOR_SCALES = (0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05)
ANCHOR_STEPS = (8, 16, 32, 64, 100, 300)
#: backbone parts made dynamic for the paper's PEDConv count (the trunk follows its own placement)
PAPER_DYNAMIC_PARTS = ("extras",)


class SSDResNetBackbone(nn.Module):
    """ResNet trunk to layer3 (stride 8) + SSD's five extra blocks; returns six maps in an OrderedDict."""

    def __init__(self, trunk: nn.Module, trunk_channels: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.out_channels = [trunk_channels, *EXTRA_CHANNELS]
        blocks = []
        for i, (cin, cout, mid) in enumerate(zip(self.out_channels[:-1], self.out_channels[1:], EXTRA_MIDDLE)):
            stride, padding = (2, 1) if i < 3 else (1, 0)
            blocks.append(nn.Sequential(
                nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                nn.Conv2d(mid, cout, 3, stride=stride, padding=padding, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ))
        self.extras = nn.ModuleList(blocks)
        for module in self.extras.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.trunk(x)["layer3"]
        out: OrderedDict[str, torch.Tensor] = OrderedDict([("0", x)])
        for i, block in enumerate(self.extras, 1):
            x = block(x)
            out[str(i)] = x
        return out


def _stride_one_layer3(trunk: nn.Module) -> None:
    """NVIDIA's SSD-ResNet: conv4_x keeps stride 8 (every conv of its first block, shortcut included, at
    stride 1; static and dynamic convs both read ``stride`` at forward time)."""
    for module in trunk.get_submodule("layer3.0").modules():
        if isinstance(module, (nn.Conv2d, DynamicConv2d)):
            module.stride = (1, 1)


def build_ssd300(
    conv: str = "static",
    backbone: str = "resnet50",
    num_classes: int = COCO_NUM_CLASSES,
    trunk_placement: str = "paper",
    dynamic_parts: Optional[Sequence[str]] = None,
    pretrained_backbone: Optional[str] = None,
    size: int = 300,
    **kwargs,
) -> SSD:
    """torchvision ``SSD`` with the ResNet SSD300 configuration (module docstring).

    ``conv`` goes into the trunk at ``trunk_placement`` and into the backbone parts ``dynamic_parts``
    (default: the extra blocks, reproducing the paper's count; ``()`` keeps them static). ``kwargs`` go to
    ``SSD`` (``score_thresh``, ``detections_per_img``, ...). Images are normalised with the ImageNet mean/std
    (the trunk's classification statistics) and resized to ``size`` x ``size`` by SSD's transform.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (categories + background), got {num_classes!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 257:
        raise ValueError(f"SSD300's extra blocks need an input of at least 257 px, got {size!r}")
    spec = parse_spec(conv)
    parts = PAPER_DYNAMIC_PARTS if dynamic_parts is None else tuple(dynamic_parts)
    bad = [p for p in parts if p != "extras"]
    if bad:
        raise ValueError(f"unknown SSD backbone part {bad[0]!r}; valid parts: extras")
    channels = stage_channels(backbone)
    trunk = build_resnet_trunk(backbone, str(spec), trunk_placement, return_layers=("layer3",),
                               pretrained=pretrained_backbone)
    _stride_one_layer3(trunk)
    body = SSDResNetBackbone(trunk, channels[2])
    extra_convs = [f"backbone.{n}" for n in convert_parts(body, str(spec), parts)]
    anchors = DefaultBoxGenerator([list(r) for r in ANCHOR_RATIOS], scales=list(ANCHOR_SCALES),
                                  steps=list(ANCHOR_STEPS))
    head = SSDHead(body.out_channels, anchors.num_anchors_per_location(), num_classes)
    kwargs.setdefault("image_mean", list(IMAGENET_MEAN))
    kwargs.setdefault("image_std", list(IMAGENET_STD))
    model = SSD(body, anchors, (size, size), num_classes, head=head, **kwargs)
    trunk_convs = [f"backbone.trunk.{n}" for n in getattr(trunk, "dynamic_convs", [])]
    record_build(model, dynamic_convs=trunk_convs + extra_convs,
                 arch="ssd300", conv=str(spec), backbone_arch=backbone, trunk_placement=trunk_placement,
                 dynamic_parts=parts if not spec.is_static else ())
    return model


class DetectorFeatures(nn.Module):
    """Backbone + heads of an SSD on a normalised batch, without the transform, box decoding and NMS (what MAC
    counting and profiling run: :func:`image_classification.measurement.paper_tables.detector_macs`)."""

    def __init__(self, model: SSD) -> None:
        super().__init__()
        self.backbone, self.head = model.backbone, model.head

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.head(list(self.backbone(x).values()))


def feature_sizes(model: SSD, size: int = 300) -> List[int]:
    """Side of each feature map at ``size`` px (38, 19, 10, 5, 3, 1 at 300)."""
    with torch.no_grad():
        was = model.training
        model.eval()
        try:
            feats = model.backbone(torch.zeros(1, 3, size, size))
        finally:
            model.train(was)
    return [int(f.shape[-1]) for f in feats.values()]
