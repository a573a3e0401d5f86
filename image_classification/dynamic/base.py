"""What every dynamic operator shares: nn.Conv2d geometry, validation, and model-level hooks."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.utils import _pair

from .functional import conv_output_size
from .protocol import OperatorProtocol
from .spec import check_options

__all__ = ["DynamicConv2d", "infomax_loss", "set_epoch", "dynamic_modules"]


class DynamicConv2d(nn.Module, OperatorProtocol):
    """Base class of the dynamic operators: holds and validates nn.Conv2d's geometry.

    Subclasses implement ``forward``. Two optional hooks are called by the trainer through the
    model-level functions below:

    * ``infomax_term()`` -> the info-max loss of the last training forward (or None);
    * ``set_epoch(epoch)`` -> per-epoch schedules (DY-Conv's softmax temperature).

    The hooks the rest of the project asks of an operator (MACs, BatchNorm gamma, placement,
    classifier, foreign checkpoint layouts) come from :class:`~.protocol.OperatorProtocol`.
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
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive integer, got {value!r}")
        if in_channels % groups:
            raise ValueError(
                f"{type(self).__name__}: in_channels ({in_channels}) must be divisible by groups ({groups})"
            )
        if out_channels % groups:
            raise ValueError(
                f"{type(self).__name__}: out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        if isinstance(padding, str):
            raise ValueError(f"{type(self).__name__}: string padding {padding!r} is not supported; give integers")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size: Tuple[int, int] = _pair(kernel_size)
        self.stride: Tuple[int, int] = _pair(stride)
        self.padding: Tuple[int, int] = _pair(padding)
        self.dilation: Tuple[int, int] = _pair(dilation)
        self.groups = groups
        for name in ("kernel_size", "stride", "dilation"):
            if min(getattr(self, name)) <= 0:
                raise ValueError(f"{type(self).__name__}: {name} must be positive, got {getattr(self, name)}")
        if min(self.padding) < 0:
            raise ValueError(f"{type(self).__name__}: padding must be >= 0, got {self.padding}")
        self.use_bias = bias

    def check_options(self, **values: Any) -> None:
        """Check constructor arguments against this operator's registered spec Options (type, choices,
        minimum): one place validates an option, whether it comes from a spec string or a constructor."""
        check_options(type(self), values)

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """Spatial output size, identical to nn.Conv2d's formula."""
        return conv_output_size((height, width), self.kernel_size, self.stride, self.padding, self.dilation)

    def static_macs(self, input_shape: Tuple[int, ...]) -> int:
        """MACs of nn.Conv2d of this geometry on an input of ``input_shape`` (B x C x H x W):
        ``B H_out W_out C_out (C_in / groups) k_h k_w``."""
        batch, _, height, width = (int(s) for s in input_shape)
        out_h, out_w = self.output_size(height, width)
        kh, kw = self.kernel_size
        return batch * out_h * out_w * self.out_channels * (self.in_channels // self.groups) * kh * kw

    def conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)

    def infomax_term(self) -> Optional[torch.Tensor]:
        return None

    def set_epoch(self, epoch: int) -> None:  # noqa: B027 - optional hook
        pass

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.use_bias}"
        )


def dynamic_modules(model: nn.Module):
    """Yield every module of ``model`` that has the dynamic-operator hooks."""
    for module in model.modules():
        if isinstance(module, DynamicConv2d):
            yield module


def infomax_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """Sum of the info-max terms (PEDConv Eq. 6, MSE form) of the last training forward, or None.

    None means no layer of the model produced one (eval mode, or no PEDConv layer).
    """
    total: Optional[torch.Tensor] = None
    for module in model.modules():
        term_fn = getattr(module, "infomax_term", None)
        if term_fn is None or not callable(term_fn):
            continue
        term = term_fn()
        if term is not None:
            total = term if total is None else total + term
    return total


def set_epoch(model: nn.Module, epoch: int) -> None:
    """Tell every operator of ``model`` that ``epoch`` (0-based) starts (DY-Conv temperature etc.)."""
    for module in model.modules():
        hook = getattr(module, "set_epoch", None)
        if hook is not None and module is not model and isinstance(module, DynamicConv2d):
            hook(epoch)
