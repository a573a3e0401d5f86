"""CondConv (Yang et al., NeurIPS 2019): conditionally parameterized convolution.

``Output(x) = ((r_1(x) W_1 + ... + r_K(x) W_K) * x)`` (report Eq. 5) with K = 8 experts and the
routing function ``r(x) = sigmoid(FC(GAP(x)))`` (one FC with bias, C_in -> K).

Parameters: ``K * (C_out * C_in/g * k^2 [+ C_out])`` experts plus routing ``C_in * K + K``.

Execution (shared with DY-Conv, :class:`~.dyconv.KernelMixtureConv2d`): the experts are combined
per sample once, then one grouped convolution with ``groups = B * groups`` runs (a plain conv at batch
1) - the report's Eq. 6 observation that combining kernels first is cheaper than K convolutions.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

from .dyconv import KernelMixtureConv2d
from .registry import Option, register_operator

__all__ = ["CondConv2d"]


@register_operator(
    "condconv",
    options={"k": Option(int, 8, "number of experts K", minimum=1)},
    help="CondConv (Yang et al. 2019): sigmoid routing over K experts",
)
class CondConv2d(KernelMixtureConv2d):
    """CondConv (Yang et al., 2019): ``W(x) = sum_k sigmoid(FC(GAP(x)))_k W_k``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Tuple[int, int],
        stride: int | Tuple[int, int] = 1,
        padding: int | Tuple[int, int] = 0,
        dilation: int | Tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        k: int = 8,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_kernels=k)
        self.routing = nn.Linear(in_channels, k)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.routing(x.mean((2, 3))))
