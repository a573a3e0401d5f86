"""``static``: plain nn.Conv2d, registered so every comparison runs through the same code."""

from __future__ import annotations

from typing import Tuple

import torch.nn as nn

from .functional import conv_output_size
from .protocol import OperatorProtocol
from .registry import register_operator

__all__ = ["StaticConv2d"]


@register_operator("static", help="plain nn.Conv2d (the baseline)")
class StaticConv2d(nn.Conv2d, OperatorProtocol):
    """A plain :class:`torch.nn.Conv2d`; building it through the registry keeps one code path."""

    def macs(self, input_shape: Tuple[int, ...]) -> int:
        """``B H_out W_out C_out (C_in / groups) k_h k_w`` (the papers' count of a convolution)."""
        batch, _, height, width = (int(s) for s in input_shape)
        if self.padding == "same":  # nn.Conv2d allows it at stride 1 only: the output keeps the input's size
            out = (height, width)
        else:
            pads = (0, 0) if isinstance(self.padding, str) else self.padding  # 'valid': no padding
            out = conv_output_size((height, width), self.kernel_size, self.stride, pads, self.dilation)
        kh, kw = self.kernel_size
        return batch * out[0] * out[1] * self.out_channels * (self.in_channels // self.groups) * kh * kw

    def load_static_weight(self, weight, bias=None) -> None:
        self.weight.data.copy_(weight)
        if bias is not None and self.bias is not None:
            self.bias.data.copy_(bias)
