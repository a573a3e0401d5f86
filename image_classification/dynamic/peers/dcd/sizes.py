"""DCD's size rules: the paper's latent size (DCD, ICLR 2021, Sec. 3.2) and the released modules' latent,
context and hidden sizes (``sizing``; docs/operators.md, "DCD as released")."""

from __future__ import annotations

import math
from typing import Tuple

__all__ = ["RELEASED_CLASSIFIER_WIDTH", "SIZINGS", "default_latent", "released_sizes"]

#: latent/context/hidden size rules: the paper's, and those of the three released modules
SIZINGS = ("auto", "paper", "resnet_basic", "resnet_bottleneck", "mobilenetv2")
#: latent size and hidden width of the released classifier (``DYCls``), whatever its input width
RELEASED_CLASSIFIER_WIDTH = 32


def default_latent(channels: int) -> int:
    """Paper default latent size ``floor(C / 2^floor(log2 sqrt(C)))`` (section 3.2), at least 1."""
    if channels <= 1:
        return 1
    return max(1, channels // 2 ** int(math.floor(math.log2(math.sqrt(channels)))))


def released_sizes(sizing: str, in_channels: int, out_channels: int, reduction: int, pool: int = 0,
                   latent: int = 0) -> Tuple[int, int, int]:
    """``(pool, L, s)`` of a channel-fusion layer under one of the released modules' rules.

    ``sizing``: ``resnet_basic`` (``conv_basic_dy``), ``resnet_bottleneck`` (``conv_dy``) or
    ``mobilenetv2`` (``DYModule``); see docs/operators.md. ``in_channels``/``out_channels`` are
    per diagonal block; a non-zero ``pool`` or ``latent`` replaces the rule's value.
    """
    if sizing == "mobilenetv2":
        expanding = in_channels < out_channels
        pool = pool or (2 if expanding else 1)
        ctx = in_channels * pool * pool
        if not latent:
            divisor = 8 if expanding else 2
            latent = min(ctx // divisor, out_channels // divisor)
            while latent * latent > 2 * ctx:
                divisor *= 2
                latent = min(ctx // divisor, out_channels // divisor)
            latent = max(latent, 4)
    elif sizing in ("resnet_basic", "resnet_bottleneck"):
        pool = pool or (2 if sizing == "resnet_basic" else 1)
        ctx = in_channels * pool * pool
        latent = latent or max(1, math.isqrt(ctx))
    else:
        raise ValueError(
            f"released_sizes: sizing must be resnet_basic, resnet_bottleneck or mobilenetv2, got {sizing!r}"
        )
    floor = 1 if sizing == "resnet_bottleneck" else 4  # conv_dy has no floor (0 would be no layer at all)
    return pool, latent, max(floor, max(ctx, latent * latent) // reduction)

