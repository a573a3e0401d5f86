"""MobileNetV1 (Howard et al. 2017) at any width, and torchvision's MobileNetV2.

MobileNetV1: 3x3/2 stem, 13 depthwise-separable blocks (3x3 depthwise + 1x1 pointwise, each with
BN and ReLU), adaptive average pooling and a linear classifier; 4.2M parameters and 569M MACs at
width 1.0 and 224 px (PEDConv, BMVC 2021, Table 1a). Widths 0.25/0.5/0.75/1.0 as in the PEDConv appendix,
Sec. C, Fig. 3.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torchvision.models import mobilenetv2 as tv
from torchvision.ops.misc import Conv2dNormActivation

from .module_utils import check_positive_int, set_in_chans

__all__ = ["DepthwiseSeparable", "MobileNetV1", "mobilenet_v1", "mobilenet_v2"]

# (output channels, stride) of the 13 depthwise-separable blocks
_V1_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


def _check_width(width_mult: float) -> float:
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or width_mult <= 0:
        raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
    return float(width_mult)


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv-BN-ReLU followed by 1x1 pointwise conv-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.dw = Conv2dNormActivation(in_channels, in_channels, 3, stride=stride, groups=in_channels)
        self.pw = Conv2dNormActivation(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class MobileNetV1(nn.Module):
    def __init__(
        self, num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_chans", in_chans)
        width = _check_width(width_mult)

        def ch(c: int) -> int:
            return max(8, int(c * width))

        layers: list = [Conv2dNormActivation(in_chans, ch(32), 3, stride=2)]
        cin = ch(32)
        for cout, stride in _V1_BLOCKS:
            layers.append(DepthwiseSeparable(cin, ch(cout), stride))
            cin = ch(cout)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(cin, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v1(num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0, **kw: Any) -> MobileNetV1:
    return MobileNetV1(num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, **kw)


def mobilenet_v2(num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0, **kw: Any) -> tv.MobileNetV2:
    """torchvision's MobileNetV2 (its classifier follows an adaptive pooling, so any input size works)."""
    check_positive_int("num_classes", num_classes)
    model = tv.MobileNetV2(num_classes=num_classes, width_mult=_check_width(width_mult), **kw)
    return set_in_chans(model, in_chans)
