"""The per-sample mixture of K convolution kernels shared by DY-Conv and CondConv.

``W(x) = sum_k pi_k(x) W_k`` and ``b(x) = sum_k pi_k(x) b_k`` (DY-Conv, CVPR 2020, Eq. 1; CondConv,
NeurIPS 2019, Eq. 1); the subclass says how ``pi(x)`` is computed (:meth:`attention`: softmax with a
temperature for DY-Conv, sigmoid routing for CondConv). Execution: the K kernels (and biases) are
aggregated per sample once (``B x K`` by ``K x numel`` matmul) and applied in a single grouped
convolution with ``groups = B * groups``; at batch 1 that is a plain convolution.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base import DynamicConv2d
from ..protocol import ExportRoute, PerSampleUnfoldConv2d

__all__ = ["KernelMixtureConv2d"]


class KernelMixtureConv2d(DynamicConv2d):
    """A convolution whose weight is a per-sample mixture of ``num_kernels`` kernels (Eq. 1).

    Subclasses implement :meth:`attention` (B x K mixture coefficients).
    """

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
        num_kernels: int = 4,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.check_options(k=num_kernels)  # the subclasses register the number of kernels as ``k``
        self.num_kernels = num_kernels
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(num_kernels, out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(num_kernels, out_channels)) if bias else None
        self.reset_kernels()

    def reset_kernels(self) -> None:
        for k in range(self.num_kernels):
            nn.init.kaiming_uniform_(self.weight.data[k], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0, 0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def load_static_weight(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        """Copy a static conv's weight (and bias) into every kernel, exactly (no noise).

        DY-Conv's softmax sums to 1, so the seeded layer starts equal to the static conv; CondConv's
        sigmoid routing scales it by ``sum_k sigmoid(z_k)`` until the experts diverge.
        """
        if weight.shape != self.weight.shape[1:]:
            raise ValueError(
                f"{type(self).__name__}: static weight shape {tuple(weight.shape)} != {tuple(self.weight.shape[1:])}"
            )
        with torch.no_grad():
            self.weight.copy_(weight.unsqueeze(0).expand_as(self.weight))
            if self.bias is not None:
                if bias is None:
                    self.bias.zero_()
                else:
                    self.bias.copy_(bias.unsqueeze(0).expand_as(self.bias))

    def attention(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def attention_macs(self) -> int:
        """MACs of one sample's mixture coefficients (subclasses: their attention / routing FCs)."""
        return 0

    def analysis_coefficients(self, x: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
        """The mixture coefficients ``pi`` (B x K)."""
        pi = self.attention(x)
        return {"pi": pi.reshape(pi.shape[0], -1)}

    def export_route(self) -> ExportRoute:
        """Export through :class:`~.protocol.PerSampleUnfoldConv2d` (the fast path groups over the batch)."""
        return ExportRoute(adapter=PerSampleUnfoldConv2d, label="unfold (per-sample weight)")

    def macs(self, input_shape: Tuple[int, ...]) -> int:
        """``B (H_out W_out C_out C_in/g k^2 + K C_out C_in/g k^2 + attention)``: the one convolution with
        the aggregated kernel, the aggregation ``sum_k pi_k W_k`` and the attention (DCD paper's count of
        DY-Conv; the bias aggregation, ``K C_out``, is not counted)."""
        batch = int(input_shape[0])
        return (self.static_macs(input_shape)
                + batch * (self.num_kernels * self.weight[0].numel() + self.attention_macs()))

    def dynamic_weight(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample aggregated weight ``sum_k pi_k(x) W_k`` (B x C_out x C_in/g x kh x kw)."""
        pi = self.attention(x)
        return (pi @ self.weight.reshape(self.num_kernels, -1)).reshape(x.shape[0], *self.weight.shape[1:])

    def dynamic_bias(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample aggregated bias (B x C_out), or None."""
        return None if self.bias is None else self.attention(x) @ self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: expected input B x {self.in_channels} x H x W, got {tuple(x.shape)}"
            )
        b = x.shape[0]
        pi = self.attention(x)
        w = pi @ self.weight.reshape(self.num_kernels, -1)
        bias = None if self.bias is None else (pi @ self.bias).reshape(-1)
        if b == 1:
            return F.conv2d(x, w.reshape(self.weight.shape[1:]), bias, groups=self.groups, **self.conv_kwargs())
        y = F.conv2d(x.reshape(1, b * self.in_channels, *x.shape[2:]), w.reshape(-1, *self.weight.shape[2:]), bias,
                     groups=b * self.groups, **self.conv_kwargs())
        return y.reshape(b, self.out_channels, *y.shape[2:])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.num_kernels}"
