"""CondConv (Yang et al., NeurIPS 2019): conditionally parameterized convolution.

``Output(x) = ((r_1(x) W_1 + ... + r_K(x) W_K) * x)`` (report Eq. 5) with K = 8 experts and the
routing function ``r(x) = sigmoid(FC(GAP(x)))`` (one FC with bias, C_in -> K).

Routing (``routing`` option):

* ``conv`` (default): every CondConv layer has its own routing function on its own input (report
  Eq. 5; the form the MobileNet/ResNet rows of the papers' tables are counted with).
* ``block``: the CondConv layers of one network block (an inverted residual / MBConv, or any block
  :mod:`image_classification.models.convert` recognises) share one routing function computed from
  the *block's* input, ``r(x_block) = sigmoid(FC(GAP(x_block)))`` - the CondConv paper's
  EfficientNet design (its released TensorFlow model; timm's ``CondConvResidual``), where the
  expansion, depthwise and projection convs of a block mix their experts with the same weights.
  :func:`share_block_routing` sets it up (``convert_model`` calls it): the FC lives in the block as
  ``<block>.condconv_routing.fc`` and a forward pre-hook of the block hands the routing weights to
  its CondConv layers. A layer outside any block keeps its own routing (its input is its block's).

Parameters: ``K * (C_out * C_in/g * k^2 [+ C_out])`` experts plus routing ``C_in * K + K`` per
layer (``routing=conv``) or per block (``routing=block``, ``C_in`` of the block input). With
``routing=block`` and K = 4 on the convs of EfficientNet-B0's last three stages (placement
``deep+inblock``), EfficientNet-B0 has 13.31M parameters: the CondConv row of PEDConv Table 1
(13.3M; K = 8 gives 24.01M).

Execution (shared with DY-Conv, :class:`~.kernel_mixture.KernelMixtureConv2d`): the experts are combined
per sample once, then one grouped convolution with ``groups = B * groups`` runs (a plain conv at batch
1) - combining the kernels first equals the mixture of K convolutions at the cost of one (CondConv, NeurIPS 2019,
Sec. 2).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..registry import ConvSpec, Option, register_operator
from .kernel_mixture import KernelMixtureConv2d

__all__ = ["CondConv2d", "BlockRouting", "ROUTINGS", "share_block_routing"]

ROUTINGS = ("conv", "block")
#: attribute name of the shared routing module inside a block
ROUTING_ATTR = "condconv_routing"


@register_operator(
    "condconv",
    options={
        "k": Option(int, 8, "number of experts K", minimum=1),
        "routing": Option(str, "conv", "routing function per conv, or one per block shared by its convs and "
                          "computed from the block input (the CondConv paper's EfficientNet)", choices=ROUTINGS),
    },
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
        routing: str = "conv",
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_kernels=k)
        self.check_options(routing=routing)
        self.routing_mode = routing
        # own routing function; share_block_routing() removes it when the block's one takes over
        self.routing: Optional[nn.Linear] = nn.Linear(in_channels, k)
        self._block_routing: Optional[torch.Tensor] = None  # set by the block's pre-hook, one per forward

    def __getstate__(self) -> Dict[str, Any]:
        # the cached routing weights belong to the last forward's graph: leave them out of deepcopy (EMA)/pickle
        state = self.__dict__.copy()
        state["_block_routing"] = None
        return state

    def fold_output_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Refused (ValueError): the sigmoid routing weights do not sum to 1, so a BatchNorm's shift cannot
        become expert biases."""
        raise ValueError("sigmoid routing weights do not sum to 1, so the BN shift cannot become expert biases")

    def attention_macs(self) -> int:
        """``C_in K`` for the layer's own routing FC; 0 with ``routing=block`` (the block's FC is counted there)."""
        return 0 if self.routing is None else self.routing.in_features * self.routing.out_features

    @classmethod
    def after_conversion(cls, spec: ConvSpec, model: nn.Module, converted: Sequence[str],
                         sites: Sequence[Any]) -> None:
        """``routing=block``: one routing function per block for the converted convs in it
        (:func:`share_block_routing`, fed with the block input)."""
        if spec.options.get("routing") != "block":
            return
        chosen = set(converted)
        by_block: Dict[str, Dict[str, CondConv2d]] = {}
        width: Dict[str, int] = {}
        for site in sites:  # registration order: a block's first conv reads the block input
            width.setdefault(site.block, site.in_channels)
            if site.name in chosen and site.block != site.name:
                conv = model.get_submodule(site.name)
                if isinstance(conv, CondConv2d):
                    by_block.setdefault(site.block, {})[site.name[len(site.block) + 1:]] = conv
        for block, convs in by_block.items():
            share_block_routing(model.get_submodule(block), convs, width[block])

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing is not None:
            return torch.sigmoid(self.routing(x.mean((2, 3))))
        weights = self._block_routing
        if weights is None or weights.shape[0] != x.shape[0]:
            raise RuntimeError("CondConv2d shares its block's routing (routing=block): run the enclosing block, "
                               "whose forward pre-hook computes the routing weights from the block input")
        return weights

    def extra_repr(self) -> str:
        return super().extra_repr() + (", routing=block" if self.routing is None else "")


class BlockRouting(nn.Module):
    """One routing function for the CondConv layers of a block: ``sigmoid(FC(GAP(x_block)))``."""

    def __init__(self, in_channels: int, num_experts: int, conv_names: Sequence[str]) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_experts)
        self.conv_names = tuple(conv_names)  # relative to the block; plain strings survive deepcopy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.fc.in_features:
            raise ValueError(f"BlockRouting: expected the block input B x {self.fc.in_features} x H x W, "
                             f"got {tuple(x.shape)}")
        return torch.sigmoid(self.fc(x.mean((2, 3))))

    def extra_repr(self) -> str:
        return f"convs={', '.join(self.conv_names)}"


def _route_block(block: nn.Module, args: Tuple[Any, ...]) -> None:
    """Forward pre-hook of a block: compute the shared routing weights and hand them to its convs."""
    router = getattr(block, ROUTING_ATTR)
    weights = router(args[0])
    for name in router.conv_names:
        block.get_submodule(name)._block_routing = weights


def share_block_routing(block: nn.Module, convs: Dict[str, CondConv2d], in_channels: int) -> BlockRouting:
    """Make the CondConv layers ``convs`` (names relative to ``block``) share one routing function.

    ``in_channels`` is the width of the block's input. The layers' own routing FCs are removed;
    ``block.condconv_routing`` holds the shared one and a forward pre-hook of ``block`` runs it.
    """
    if not convs:
        raise ValueError("share_block_routing: no CondConv layer given")
    if hasattr(block, ROUTING_ATTR):
        raise ValueError(f"share_block_routing: {type(block).__name__} already has a shared routing")
    experts = {conv.num_kernels for conv in convs.values()}
    if len(experts) != 1:
        raise ValueError(f"share_block_routing: the convs of one block need the same number of experts, got {experts}")
    for name, conv in convs.items():
        if not isinstance(conv, CondConv2d) or conv.routing is None:
            raise ValueError(f"share_block_routing: {name} is not a CondConv2d with its own routing")
    first = next(iter(convs.values()))
    router = BlockRouting(in_channels, experts.pop(), list(convs))
    router = router.to(device=first.weight.device, dtype=first.weight.dtype)
    setattr(block, ROUTING_ATTR, router)
    for conv in convs.values():
        conv.routing = None
    block.register_forward_pre_hook(_route_block)
    return router
