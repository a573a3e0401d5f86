"""Involution (Li et al., CVPR 2021): a per-pixel K x K kernel shared by groups of channels.

Report Eq. 2-4: at every output position i the kernel ``H_i = W_1 sigma(W_0 X_i)`` (``W_0``: 1x1
conv C -> C/r, ``sigma``: BatchNorm + ReLU, ``W_1``: 1x1 conv C/r -> K*K*G) is generated from the
channel vector there and applied to the K x K neighbourhood of every channel of its group:
``Y_{c,i} = sum_{p} H_{g(c),i}[p] X_{c, i+p}``, with G = C / group_channels groups (16 channels per
group, reduction 4, as in RedNet).

Geometry: RedNet generates kernels for a strided involution from ``AvgPool2d(stride)`` of the
input; here the generating map is the input average-pooled to the output size
(``adaptive_avg_pool2d``), which is that for even sizes and extends it to any stride, padding and
dilation. Involution maps C -> C and mixes no channels; to be a drop-in for any nn.Conv2d it is
followed by a 1x1 convolution ``C_in -> C_out`` (with the conv's ``groups``) when ``out_channels !=
in_channels`` - RedNet's bottleneck surrounds involution with 1x1 convs the same way. With
``out_channels == in_channels`` (any ``groups``, depthwise included) no projection is added; the
conv's bias, if any, is a learned per-channel bias added to the output.

Parameters: ``C * C/r`` (W_0, no bias) + ``2 * C/r`` (BN) + ``C/r * K^2 G + K^2 G`` (W_1 with bias)
[+ ``C_in/g * C_out`` projection] [+ ``C_out`` bias].

Execution: the kernels (B x G x K^2 x H' x W') are applied through ``F.unfold`` (B x C x K^2 x
H'W' patches), multiplied and summed over the K^2 taps.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..base import DynamicConv2d
from ..protocol import ExportRoute
from ..registry import Option, register_operator

__all__ = ["Involution2d"]


@register_operator(
    "involution",
    options={
        "group_channels": Option(int, 16, "channels sharing one kernel", minimum=1),
        "reduction": Option(int, 4, "reduction ratio r of the kernel generator", minimum=1),
    },
    help="Involution (Li et al. 2021): per-pixel kernels shared by channel groups",
)
class Involution2d(DynamicConv2d):
    """Involution (Li et al., 2021), report Eq. 2-4; see the module docstring for geometry."""

    #: RedNet's place: one involution per residual block (the 3x3 of a bottleneck; the CondConv/Involution
    #: report, Sec. 3.2: the second conv of a basic block), with static convs between. Its output is quadratic in its
    #: input (the kernel is generated from what it multiplies), so two in a row per block (``paper`` on
    #: basic blocks) square any eval-mode scale mismatch twice per block: after two SGD steps the eval
    #: activations of CIFAR ResNet-20 reached 1e31 and the validation loss NaN, at any lr
    default_placement = "paper+last"

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
        group_channels: int = 16,
        reduction: int = 4,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.check_options(group_channels=group_channels, reduction=reduction)
        if in_channels % group_channels:
            raise ValueError(
                f"Involution2d: in_channels ({in_channels}) must be divisible by group_channels ({group_channels})"
            )
        self.group_channels = group_channels
        self.reduction = reduction
        self.num_groups = in_channels // group_channels
        mid = max(1, in_channels // reduction)
        kh, kw = self.kernel_size
        self.reduce = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn = nn.BatchNorm2d(mid)
        self.span = nn.Conv2d(mid, kh * kw * self.num_groups, 1)
        self.proj: Optional[nn.Conv2d] = None
        if out_channels != in_channels:
            self.proj = nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=bias)
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def kernels(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel kernels ``H`` (B x G x kh*kw x H' x W'), Eq. 3."""
        out_hw = self.output_size(x.shape[2], x.shape[3])
        if tuple(x.shape[2:]) == out_hw:
            ctx = x
        elif x.shape[2] == out_hw[0] * self.stride[0] and x.shape[3] == out_hw[1] * self.stride[1]:
            # RedNet's AvgPool2d(stride), the same windows as adaptive pooling here; a constant kernel, which the
            # TorchScript-based ONNX exporter can express (adaptive pooling to a traced size it cannot)
            ctx = F.avg_pool2d(x, self.stride)
        else:
            ctx = F.adaptive_avg_pool2d(x, out_hw)
        h = self.span(F.relu(self.bn(self.reduce(ctx))))
        kh, kw = self.kernel_size
        return h.reshape(x.shape[0], self.num_groups, kh * kw, *out_hw)

    def involve(self, x: torch.Tensor) -> torch.Tensor:
        """The involution itself (C_in -> C_in), Eq. 4, before any projection or bias."""
        b, c = x.shape[:2]
        h = self.kernels(x)
        oh, ow = h.shape[-2:]
        taps = h.shape[2]
        patches = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        patches = patches.reshape(b, self.num_groups, self.group_channels, taps, oh * ow)
        y = (patches * h.reshape(b, self.num_groups, 1, taps, oh * ow)).sum(3)
        return y.reshape(b, c, oh, ow)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Involution2d: expected input B x {self.in_channels} x H x W, got {tuple(x.shape)}")
        y = self.involve(x)
        if self.proj is not None:
            return self.proj(y)
        if self.bias is not None:
            y = y + self.bias[:, None, None]
        return y

    @torch.no_grad()
    def fold_output_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Fold a following per-output-channel affine map into the 1x1 projection (exact); without a
        projection it is refused (ValueError): each output channel then comes from a kernel shared by its
        channel group and from the input that generates the kernels."""
        if self.proj is None:
            raise ValueError("involution without projection: each output channel comes from a kernel shared by its "
                             "channel group and from the input that generates the kernels")
        weight, bias = fuse_conv_bn_weights(self.proj.weight, self.proj.bias, torch.zeros_like(scale),
                                            torch.ones_like(scale), 0.0, scale, shift)
        self.proj.weight = weight
        self.proj.bias = bias

    def export_route(self) -> ExportRoute:
        """Export as trained (per-pixel kernels through unfold: no grouped conv over the batch)."""
        return ExportRoute(label="unfold (as trained)")

    def macs(self, input_shape: Tuple[int, ...]) -> int:
        """MACs of what the module runs, per output position of the H' x W' map (Eq. 3-4):

        ``C C/r`` (W_0, 1x1) + ``C/r K^2 G`` (W_1, 1x1) + ``C K^2`` (each channel's K^2 taps times its
        group's kernel) [+ ``C_in/g C_out`` (the 1x1 projection when ``out_channels != in_channels``)],
        times ``B H' W'``. No dense K x K convolution runs; BatchNorm, ReLU and the pooling of the
        generating map are not counted (as in the papers).
        """
        batch, _, height, width = (int(s) for s in input_shape)
        out_h, out_w = self.output_size(height, width)
        taps = self.kernel_size[0] * self.kernel_size[1]
        mid = self.reduce.out_channels
        per_position = self.in_channels * mid + mid * self.span.out_channels + self.in_channels * taps
        if self.proj is not None:
            per_position += (self.in_channels // self.groups) * self.out_channels
        return batch * out_h * out_w * per_position

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, group_channels={self.group_channels}, groups_of_kernels={self.num_groups}, "
                f"reduction={self.reduction}, projection={self.proj is not None}")
