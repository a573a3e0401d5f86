"""DCD's size rules and the plan of one layer: which form it takes (DCD, ICLR 2021, Eq. 7-9), the paper's latent
size (Sec. 3.2) and the released modules' latent, context and hidden sizes (``sizing``; docs/operators.md, "DCD as
released"). :func:`plan_layer` decides everything :class:`~.conv.DCDConv2d` then only creates."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

__all__ = ["RELEASED_CLASSIFIER_WIDTH", "SIZINGS", "LayerPlan", "default_latent", "layer_form", "plan_layer",
           "released_sizes"]

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



def layer_form(in_per_group: int, taps: int, mode: str) -> str:
    """``depthwise`` (one input channel per group, a k x k kernel: Eq. 8 fuses the taps), ``channel`` (a 1x1 conv,
    or ``mode="channel"``: Eq. 7 with a 1x1 residual) or ``joint`` (Eq. 9)."""
    if in_per_group == 1 and taps > 1:
        return "depthwise"
    return "channel" if taps == 1 or mode == "channel" else "joint"


@dataclass(frozen=True)
class LayerPlan:
    """Every size of one DCD layer: what :class:`~.conv.DCDConv2d` creates its parameters from."""

    form: str  #: ``channel``, ``joint`` or ``depthwise`` (:func:`layer_form`)
    sizing: str  #: the rule applied (``auto`` resolved)
    blocks: int  #: diagonal blocks per group of Eq. 7 (1 for depthwise)
    num_blocks: int  #: groups x blocks (1 for depthwise)
    block_in: int  #: input channels per block, C_b (all of them for depthwise)
    latent: int  #: L
    latent_kernel: int  #: L_k (0 for the channel form)
    pool: int  #: context pooling grid
    hidden: int  #: width of the dynamic branch's hidden layer
    n_lambda: int  #: Lambda's outputs of the branch (C_out, 0 without ``lambda``)
    n_phi: int  #: Phi's outputs of the branch (0 without ``phi``)


def _paper_sizes(form: str, taps: int, in_channels: int, block_in: int, num_blocks: int, latent: int,
                 latent_kernel: int, reduction: int, pool: int) -> Tuple[int, int, int, int]:
    """``(pool, L, hidden, Phi outputs)`` by the paper's rules (Sec. 3.2): a 2x2 context for a k x k channel
    fusion, L from :func:`default_latent` (or sqrt(pool^2 C_b) for a k x k channel fusion), hidden C pool^2 / r."""
    pool = pool or (2 if form == "channel" and taps > 1 else 1)
    if form == "depthwise":
        latent, n_phi = latent_kernel, latent_kernel ** 2
    elif form == "joint":
        latent = latent or default_latent(max(1, block_in // latent_kernel))
        n_phi = num_blocks * latent ** 2 * latent_kernel
    else:
        if not latent:
            latent = max(1, int(math.isqrt(pool ** 2 * block_in))) if taps > 1 else default_latent(block_in)
        n_phi = num_blocks * latent ** 2
    return pool, latent, max(4, in_channels * pool ** 2 // reduction), n_phi


def plan_layer(in_channels: int, out_channels: int, kernel_size: Tuple[int, int], groups: int, *, mode: str,
               blocks: int, latent: int, latent_kernel: int, reduction: int, pool: int, use_lambda: bool,
               use_phi: bool, variant: str, sizing: str) -> LayerPlan:
    """The form and sizes of a DCD layer (options as :class:`~.conv.DCDConv2d` takes them; 0 = the rule's value).

    Raises ValueError for a combination no form has: the released variant or a released sizing rule on anything
    but the channel-fusion form, blocks that do not divide the channels, L_k outside 1..k^2.
    """
    if sizing == "auto":
        sizing = "paper" if variant == "paper" else "resnet_bottleneck"
    taps = kernel_size[0] * kernel_size[1]
    cin_g, cout_g = in_channels // groups, out_channels // groups
    form = layer_form(cin_g, taps, mode)
    if variant == "released" and form != "channel":
        raise ValueError(f"DCDConv2d: variant=released has no {form} form (the authors' release has channel "
                         "fusion only and keeps depthwise convs static); use variant=paper or leave this conv "
                         "static")
    if sizing != "paper" and form != "channel":
        raise ValueError(f"DCDConv2d: sizing={sizing} applies to the channel-fusion form only, not {form}")
    if form == "depthwise":  # Eq. 8 fuses taps; it has no channel blocks
        blocks, num_blocks, block_in = 1, 1, in_channels
    else:
        if cin_g % blocks or cout_g % blocks:
            raise ValueError(f"DCDConv2d: blocks ({blocks}) must divide in_channels/groups ({cin_g}) and "
                             f"out_channels/groups ({cout_g})")
        num_blocks = groups * blocks
        block_in = in_channels // num_blocks
    if form in ("joint", "depthwise"):
        latent_kernel = latent_kernel or taps // 2
        if not 1 <= latent_kernel <= taps:
            raise ValueError(f"DCDConv2d: latent_kernel must be in 1..{taps}, got {latent_kernel}")
    else:
        latent_kernel = 0
    if sizing == "paper":
        pool, latent, hidden, n_phi = _paper_sizes(form, taps, in_channels, block_in, num_blocks, latent,
                                                   latent_kernel, reduction, pool)
    else:
        pool, latent, hidden = released_sizes(sizing, block_in, out_channels // num_blocks, reduction, pool, latent)
        if num_blocks > 1:  # the rules are per block; the branch sees the whole input
            floor = 1 if sizing == "resnet_bottleneck" else 4
            hidden = max(floor, max(in_channels * pool ** 2, num_blocks * latent ** 2) // reduction)
        n_phi = num_blocks * latent ** 2
    return LayerPlan(form=form, sizing=sizing, blocks=blocks, num_blocks=num_blocks, block_in=block_in,
                     latent=latent, latent_kernel=latent_kernel, pool=pool, hidden=hidden,
                     n_lambda=out_channels if use_lambda else 0, n_phi=n_phi if use_phi else 0)
