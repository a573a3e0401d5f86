"""``static``: plain nn.Conv2d, registered so every comparison runs through the same code."""

from __future__ import annotations

import torch.nn as nn

from .registry import register_operator

__all__ = ["StaticConv2d"]


@register_operator("static", help="plain nn.Conv2d (the baseline)")
class StaticConv2d(nn.Conv2d):
    """A plain :class:`torch.nn.Conv2d`; building it through the registry keeps one code path."""

    def load_static_weight(self, weight, bias=None) -> None:
        self.weight.data.copy_(weight)
        if bias is not None and self.bias is not None:
            self.bias.data.copy_(bias)
