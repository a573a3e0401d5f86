"""Weight initialisation schemes matching DeepLearningExamples' ``-c classic|fanin|fanout``.

DeepLearningExamples' ResNet configs (``resnet_configs``) initialise every conv with
``kaiming_normal_(mode=conv_init, nonlinearity='relu')`` (``classic``: ``fan_out``, ``fanin``:
``fan_in``) and every BatchNorm with gamma 1 / beta 0 (``last_bn_0_init`` is False in both).

* ``classic``: the architecture's own default (torchvision's). For torchvision ResNets this *is*
  DLE's classic (kaiming-normal fan_out, BN 1/0); MobileNet/EfficientNet keep torchvision's choice.
* ``fanin`` / ``fanout``: kaiming-normal with that mode on every conv (zero conv bias), BN gamma 1,
  beta 0, on any architecture.

The scheme is applied to the static model *before* conversion, so dynamic operators inherit the
initialised weight as their base weight; an operator's own parameters (generators, decoders) keep
the operator's init (e.g. PEDConv's N(0, 0.01) generator heads).
"""

from __future__ import annotations

from typing import Literal

import torch.nn as nn

__all__ = ["INITS", "init_weights", "set_bn_gamma"]

INITS = ("classic", "fanin", "fanout")


def init_weights(model: nn.Module, scheme: str = "classic") -> nn.Module:
    """Apply ``scheme`` (one of :data:`INITS`) to ``model`` in place and return it."""
    if scheme not in INITS:
        raise ValueError(f"unknown init {scheme!r}; valid: {', '.join(INITS)}")
    if scheme == "classic":
        return model
    mode: Literal["fan_in", "fan_out"] = "fan_in" if scheme == "fanin" else "fan_out"
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def set_bn_gamma(model: nn.Module, value: float) -> nn.Module:
    """Set every BatchNorm's gamma to ``value`` (the PEDConv authors' release uses 0.5)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            nn.init.constant_(m.weight, value)
    return model
