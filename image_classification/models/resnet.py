"""ResNets: torchvision's ResNet-18/34/50/101, ResNet-10 and the small-image ResNet-18.

torchvision's definitions are used as they are (their static state_dicts load unchanged); ResNet-10
(DCD Table 4b) is torchvision's ``ResNet(BasicBlock, [1, 1, 1, 1])``; ``resnet18_small`` replaces the
7x7/2 stem and the max-pool by a 3x3/1 stem for 28-32 px inputs (CIFAR-10, Fashion-MNIST).
torchvision's ResNet ends in ``AdaptiveAvgPool2d``, so no input size is assumed.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from torchvision.models import resnet as tv

from .module_utils import check_positive_int, set_in_chans

__all__ = ["resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet18_small"]


def _resnet(block: type, layers: list, num_classes: int, in_chans: int, **kw: Any) -> tv.ResNet:
    check_positive_int("num_classes", num_classes)
    model = tv.ResNet(block, layers, num_classes=num_classes, **kw)
    return set_in_chans(model, in_chans)


def resnet10(num_classes: int = 1000, in_chans: int = 3, **kw: Any) -> tv.ResNet:
    """ResNet-10: BasicBlock x [1, 1, 1, 1] (DCD paper Table 4b; 5.2M parameters, 0.89G MACs)."""
    return _resnet(tv.BasicBlock, [1, 1, 1, 1], num_classes, in_chans, **kw)


def resnet18(num_classes: int = 1000, in_chans: int = 3, **kw: Any) -> tv.ResNet:
    return _resnet(tv.BasicBlock, [2, 2, 2, 2], num_classes, in_chans, **kw)


def resnet34(num_classes: int = 1000, in_chans: int = 3, **kw: Any) -> tv.ResNet:
    return _resnet(tv.BasicBlock, [3, 4, 6, 3], num_classes, in_chans, **kw)


def resnet50(num_classes: int = 1000, in_chans: int = 3, **kw: Any) -> tv.ResNet:
    return _resnet(tv.Bottleneck, [3, 4, 6, 3], num_classes, in_chans, **kw)


def resnet101(num_classes: int = 1000, in_chans: int = 3, **kw: Any) -> tv.ResNet:
    return _resnet(tv.Bottleneck, [3, 4, 23, 3], num_classes, in_chans, **kw)


def resnet18_small(num_classes: int = 10, in_chans: int = 3, **kw: Any) -> tv.ResNet:
    """ResNet-18 for 28-32 px inputs: 3x3 stride-1 stem and no max-pool (the usual CIFAR variant)."""
    model = _resnet(tv.BasicBlock, [2, 2, 2, 2], num_classes, 3, **kw)
    model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model
