"""The memory layout of a model's tensors for ``--memory-format nhwc``."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["to_channels_last"]


def to_channels_last(model: nn.Module) -> nn.Module:
    """Give every 4-D parameter and buffer exactly the strides of ``torch.channels_last``, in place; other tensors
    (the K x C_out x C_in x k x k kernel banks of DY-Conv, CondConv and ODConv, vectors) stay as they are.

    ``model.to(memory_format=torch.channels_last)`` is not enough for two reasons: it refuses tensors that are not
    4-D (the kernel banks), and it keeps a tensor that already *counts* as channels_last, such as a 1x1 kernel
    ``C_out x C_in x 1 x 1`` with strides ``(C_in, 1, 1, 1)``. The convolution's backward hands that kernel a
    gradient with the strides ``(C_in, 1, C_in, C_in)``, and DDP, whose gradient buckets take the parameter's
    strides, then copies it every step ("Grad strides do not match bucket view strides"). The same memory, with
    the strides a channels_last kernel gets, makes them agree."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dim() != 4:
                continue
            strides = torch.empty(tensor.shape, memory_format=torch.channels_last, device="meta").stride()
            if tensor.stride() != strides:
                replacement = torch.empty_strided(tensor.shape, strides, dtype=tensor.dtype, device=tensor.device)
                tensor.set_(replacement.copy_(tensor))  # type: ignore[call-overload]  # torch's stubs miss set_(Tensor)
    return model
