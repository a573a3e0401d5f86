"""torchvision's EfficientNet-B0 with configurable classes and input channels."""

from __future__ import annotations

from typing import Any

from torchvision.models import efficientnet as tv

from .module_utils import check_positive_int, set_in_chans

__all__ = ["efficientnet_b0"]


def efficientnet_b0(num_classes: int = 1000, in_chans: int = 3, **kw: Any) -> tv.EfficientNet:
    check_positive_int("num_classes", num_classes)
    model = tv.efficientnet_b0(num_classes=num_classes, **kw)
    return set_in_chans(model, in_chans)
