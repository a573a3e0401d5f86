"""PSPNet and UperNet for ADE20K (150 classes) on a static or dynamic ResNet trunk (PEDConv Table 3).

The heads are those of the ADE20K authors' reference implementation (the framework the paper follows,
Sec. 4.3), with torchvision's ResNet-50 as trunk:

* **PSPNet** (Zhao et al. 2017) on a *dilated* ResNet (layer3/layer4 dilated, output stride 8): pyramid
  pooling (bins 1, 2, 3, 6; each AdaptiveAvgPool -> 1x1 conv C5 -> 512, BN, ReLU, upsampled), concatenated
  with C5 -> 3x3 conv -> 512, BN, ReLU, Dropout2d(0.1) -> 1x1 classifier; deep supervision on layer3
  (3x3 conv C4 -> C5/4, BN, ReLU, Dropout2d(0.1), 1x1 classifier; loss weight 0.4 in training).
* **UperNet** (Xiao et al. 2018) on a plain ResNet (output stride 32): the same pyramid pooling on C5 ->
  3x3 conv -> 512 (``ppm_bottleneck``), FPN lateral 1x1 convs C2..C4 -> 512 (``fpn_in``), top-down sums,
  3x3 output convs (``fpn_out``), the four levels upsampled to C2's size, concatenated -> 3x3 conv -> 512
  (``fuse``) -> 1x1 classifier. No deep supervision.

Counts at 150 classes, deploy parameters (PEDConv's info-max decoders excluded), asserted in
``tests/segmentation/test_models.py``: static UperNet 64.10M (paper 64.1M), static PSPNet 51.45M (paper
51.5M, deep-supervision head included). The paper does not say which convs are dynamic; the
parts in :data:`SEGMENTERS` ``paper_dynamic`` reproduce its PEDConv counts: PSPNet with every conv but the
stem dynamic (trunk placement ``all``, every head part) 59.67M (paper 59.7M); UperNet with trunk placement
``all`` plus the pyramid pooling, its bottleneck and the FPN laterals 72.31M (paper 72.3M; trunk placement
``paper`` plus pyramid pooling, bottleneck and ``fuse`` also gives 72.31M; the uniform rule "every conv but
the stem" gives 73.09M).

``forward(x)`` returns an OrderedDict as torchvision's segmentation models do: ``out`` (B x classes x H x W
logits at the input size) and, for PSPNet in training, ``aux``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from image_classification.dense.backbone import build_resnet_trunk, convert_parts, stage_channels
from image_classification.dynamic.registry import parse_spec
from image_classification.models.convert import record_build

__all__ = ["PSPNet", "UperNet", "SEGMENTERS", "SegmenterEntry", "build_segmenter", "list_segmenters"]


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> BatchNorm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: per bin size, AdaptiveAvgPool -> 1x1 conv-BN-ReLU, upsampled, concatenated
    after the input (output ``in_channels + len(bins) * channels``)."""

    def __init__(self, in_channels: int, channels: int = 512, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.bins = tuple(bins)
        self.stages = nn.ModuleList(conv_bn_relu(in_channels, channels, 1) for _ in self.bins)
        self.out_channels = in_channels + len(self.bins) * channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(stage(F.adaptive_avg_pool2d(x, b)), size=size, mode="bilinear", align_corners=False)
            for b, stage in zip(self.bins, self.stages)
        ]
        return torch.cat([x, *pooled], dim=1)


class PSPNet(nn.Module):
    """PSPNet: dilated ResNet trunk, pyramid pooling head, deep supervision on layer3 (module docstring)."""

    def __init__(self, trunk: nn.Module, c4: int, c5: int, num_classes: int = 150, channels: int = 512,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = trunk
        self.ppm = PyramidPooling(c5, channels)
        self.head = nn.Sequential(conv_bn_relu(self.ppm.out_channels, channels, 3), nn.Dropout2d(dropout))
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.aux_head = nn.Sequential(conv_bn_relu(c4, c5 // 4, 3), nn.Dropout2d(dropout))
        self.aux_classifier = nn.Conv2d(c5 // 4, num_classes, 1)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        size = x.shape[-2:]
        feats = self.backbone(x)
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        logits = self.classifier(self.head(self.ppm(feats["layer4"])))
        out["out"] = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        if self.training:
            aux = self.aux_classifier(self.aux_head(feats["layer3"]))
            out["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        return out


class UperNet(nn.Module):
    """UperNet: ResNet trunk, pyramid pooling on C5, FPN over C2..C5, fused 4-level head (module docstring)."""

    def __init__(self, trunk: nn.Module, in_channels: Sequence[int], num_classes: int = 150,
                 channels: int = 512) -> None:
        super().__init__()
        self.backbone = trunk
        *lateral, c5 = in_channels
        self.ppm = PyramidPooling(c5, channels)
        self.ppm_bottleneck = conv_bn_relu(self.ppm.out_channels, channels, 3)
        self.fpn_in = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in lateral)
        self.fpn_out = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in lateral)
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        size = x.shape[-2:]
        feats = list(self.backbone(x).values())
        top = self.ppm_bottleneck(self.ppm(feats[-1]))
        levels = [top]
        for i in reversed(range(len(self.fpn_in))):
            lateral = self.fpn_in[i](feats[i])
            top = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            levels.insert(0, self.fpn_out[i](top))
        base = levels[0].shape[-2:]
        fused = torch.cat([levels[0]] + [F.interpolate(level, size=base, mode="bilinear", align_corners=False)
                                         for level in levels[1:]], dim=1)
        logits = self.classifier(self.fuse(fused))
        return OrderedDict(out=F.interpolate(logits, size=size, mode="bilinear", align_corners=False))


@dataclass(frozen=True)
class SegmenterEntry:
    builder: Callable[..., nn.Module]
    dilated: bool
    paper_trunk_placement: str  # trunk placement reproducing the paper's PEDConv count
    paper_dynamic: Tuple[str, ...]  # head parts made dynamic for the paper's PEDConv count
    parts: Tuple[str, ...]  # every head part (for validation and "all")
    help: str


def _pspnet(trunk: nn.Module, channels: Sequence[int], num_classes: int, width: int) -> nn.Module:
    return PSPNet(trunk, channels[2], channels[3], num_classes, width)


def _upernet(trunk: nn.Module, channels: Sequence[int], num_classes: int, width: int) -> nn.Module:
    return UperNet(trunk, channels, num_classes, width)


SEGMENTERS: Dict[str, SegmenterEntry] = {
    "pspnet": SegmenterEntry(_pspnet, True, "all", ("ppm", "head", "classifier", "aux_head", "aux_classifier"),
                             ("ppm", "head", "classifier", "aux_head", "aux_classifier"),
                             "PSPNet on a dilated ResNet (output stride 8), deep supervision"),
    "upernet": SegmenterEntry(_upernet, False, "all", ("ppm", "ppm_bottleneck", "fpn_in"),
                              ("ppm", "ppm_bottleneck", "fpn_in", "fpn_out", "fuse", "classifier"),
                              "UperNet (pyramid pooling + FPN) on a ResNet (output stride 32)"),
}


def list_segmenters() -> List[str]:
    return sorted(SEGMENTERS)


def build_segmenter(
    name: str,
    conv: str = "static",
    num_classes: int = 150,
    backbone: str = "resnet50",
    trunk_placement: Optional[str] = None,
    dynamic_parts: Optional[Sequence[str]] = None,
    pretrained_backbone: Optional[str] = None,
    head_channels: int = 512,
) -> nn.Module:
    """Build ``name`` (``pspnet``/``upernet``) with ``conv`` in the trunk (``trunk_placement``) and in the
    head parts ``dynamic_parts``.

    Defaults (None) reproduce the paper's PEDConv counts (module docstring); ``dynamic_parts=()`` keeps the
    head static, ``("all",)`` converts every head part. The model records ``dynamic_convs``, ``arch``,
    ``conv``, ``trunk_placement`` and ``dynamic_parts``. ``head_channels``: width of the pyramid pooling
    branches and of the heads (512 in the papers' models; smaller for smoke tests). Bad names raise ValueError
    listing the valid ones.
    """
    entry = SEGMENTERS.get(name)
    if entry is None:
        raise ValueError(f"unknown segmenter {name!r}; valid: {', '.join(list_segmenters())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(head_channels, bool) or not isinstance(head_channels, int) or head_channels < 1:
        raise ValueError(f"head_channels must be a positive integer, got {head_channels!r}")
    spec = parse_spec(conv)
    channels = stage_channels(backbone)
    placement = trunk_placement or entry.paper_trunk_placement
    parts = entry.paper_dynamic if dynamic_parts is None else tuple(dynamic_parts)
    if "all" in parts:
        parts = entry.parts
    bad = [p for p in parts if p not in entry.parts]
    if bad:
        raise ValueError(f"unknown {name} part {bad[0]!r}; valid parts: {', '.join(entry.parts)}, all")
    dilate = (False, True, True) if entry.dilated else (False, False, False)
    trunk = build_resnet_trunk(backbone, str(spec), placement, dilate=dilate, pretrained=pretrained_backbone)
    model = entry.builder(trunk, channels, num_classes, head_channels)
    head_convs = convert_parts(model, str(spec), parts)
    trunk_convs = [f"backbone.{n}" for n in getattr(trunk, "dynamic_convs", [])]
    record_build(model, dynamic_convs=trunk_convs + head_convs, arch=name, conv=str(spec), backbone_arch=backbone,
                 trunk_placement=placement, dynamic_parts=tuple(parts) if not spec.is_static else ())
    return model
