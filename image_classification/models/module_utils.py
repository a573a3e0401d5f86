"""Helpers shared by the architecture builders: replacing the stem for other input channels."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch.nn as nn

__all__ = ["first_conv", "set_in_chans", "check_positive_int"]


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def first_conv(model: nn.Module) -> Tuple[str, nn.Conv2d]:
    """The first ``nn.Conv2d`` in registration order (the stem of every torchvision CNN)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d")


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def set_in_chans(model: nn.Module, in_chans: int) -> nn.Module:
    """Give the stem conv ``in_chans`` input channels (same geometry, freshly initialised)."""
    check_positive_int("in_chans", in_chans)
    name, stem = first_conv(model)
    if stem.in_channels == in_chans:
        return model
    if stem.groups != 1:
        raise ValueError(f"cannot change the input channels of a grouped stem conv ({name})")
    geometry: Dict[str, Any] = dict(kernel_size=stem.kernel_size, stride=stem.stride, padding=stem.padding,
                                    dilation=stem.dilation)  # the stem's own (nn.Conv2d types them loosely)
    new = nn.Conv2d(in_chans, stem.out_channels, **geometry, bias=stem.bias is not None, padding_mode=stem.padding_mode)
    set_module(model, name, new)
    return model
