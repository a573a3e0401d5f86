"""CIFAR ResNet-20/56 (He et al. 2016, Sec. 4.2): 3x3 stem, three stages of 16/32/64 channels.

The blocks are torchvision's ``BasicBlock``; the shortcut that changes shape is the parameter-free
option A of the paper (stride-2 subsampling plus zero channel padding), so ResNet-20 has 0.27M and
ResNet-56 0.85M parameters at 10 classes as published.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock

from .module_utils import check_positive_int

__all__ = ["CifarResNet", "PadShortcut", "cifar_resnet20", "cifar_resnet56"]


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the channels to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class CifarResNet(nn.Module):
    """3 stages x ``n`` BasicBlocks (depth 6n+2), global average pooling, linear classifier."""

    def __init__(self, n: int, num_classes: int = 10, in_chans: int = 3, widths: tuple = (16, 32, 64)) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_chans", in_chans)
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = widths[0]
        stages = []
        for i, width in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                shortcut = PadShortcut(inplanes, width, stride) if stride != 1 or inplanes != width else None
                blocks.append(BasicBlock(inplanes, width, stride=stride, downsample=shortcut))
                inplanes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet20(num_classes: int = 10, in_chans: int = 3, **kw: Any) -> CifarResNet:
    return CifarResNet(3, num_classes=num_classes, in_chans=in_chans, **kw)


def cifar_resnet56(num_classes: int = 10, in_chans: int = 3, **kw: Any) -> CifarResNet:
    return CifarResNet(9, num_classes=num_classes, in_chans=in_chans, **kw)
