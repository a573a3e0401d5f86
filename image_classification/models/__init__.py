"""Model zoo: every architecture of the papers, buildable with any conv operator and placement.

``build_model(arch, conv="pedconv", placement="paper", num_classes=..., in_chans=...)`` builds the
static architecture, applies the init scheme, then converts its convs with :func:`convert_model`.
``list_archs()`` names the architectures; :mod:`.convert` documents the placement strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping

import torch.nn as nn
import torch.nn.functional as F

from ..dynamic.registry import ConvSpec, operator_class, parse_spec
from ..named_registry import NamedRegistry
from . import cifar_resnet, efficientnet, mobilenet, resnet
from .convert import (
    PLACEMENT_TOKENS,
    LinearAsConv,
    Placement,
    conv_sites,
    convert_model,
    parse_placement,
    select_convs,
)
from .init import INITS, init_weights, set_bn_gamma
from .layout import to_channels_last

__all__ = [
    "ARCHS",
    "INITS",
    "PLACEMENT_TOKENS",
    "ArchEntry",
    "LinearAsConv",
    "Placement",
    "build_model",
    "conv_sites",
    "convert_model",
    "init_weights",
    "set_bn_gamma",
    "list_archs",
    "parse_placement",
    "select_convs",
    "to_channels_last",
]


@dataclass(frozen=True)
class ArchEntry:
    builder: Callable[..., nn.Module]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    image_size: int = 224  # the size the papers report it at
    help: str = ""


ARCHS: NamedRegistry[ArchEntry] = NamedRegistry("arch")
ARCHS.update({
    "resnet10": ArchEntry(resnet.resnet10, help="ResNet-10, BasicBlock x [1,1,1,1] (DCD Table 4b)"),
    "resnet18": ArchEntry(resnet.resnet18, help="torchvision ResNet-18"),
    "resnet34": ArchEntry(resnet.resnet34, help="torchvision ResNet-34"),
    "resnet50": ArchEntry(resnet.resnet50, help="torchvision ResNet-50"),
    "resnet101": ArchEntry(resnet.resnet101, help="torchvision ResNet-101"),
    "resnet18_small": ArchEntry(resnet.resnet18_small, image_size=32,
                                help="ResNet-18 with a 3x3/1 stem and no max-pool (28-32 px)"),
    "cifar_resnet20": ArchEntry(cifar_resnet.cifar_resnet20, image_size=32, help="CIFAR ResNet-20 (16/32/64)"),
    "cifar_resnet56": ArchEntry(cifar_resnet.cifar_resnet56, image_size=32, help="CIFAR ResNet-56 (16/32/64)"),
    "efficientnet_b0": ArchEntry(efficientnet.efficientnet_b0, help="torchvision EfficientNet-B0"),
})
for _w in ("1.0", "0.75", "0.5", "0.25"):
    ARCHS[f"mobilenet_v1_x{_w}"] = ArchEntry(mobilenet.mobilenet_v1, {"width_mult": float(_w)},
                                             help=f"MobileNetV1 at width {_w}")
for _w in ("1.0", "0.5", "0.35"):
    ARCHS[f"mobilenet_v2_x{_w}"] = ArchEntry(mobilenet.mobilenet_v2, {"width_mult": float(_w)},
                                             help=f"torchvision MobileNetV2 at width {_w}")
ARCHS["mobilenet_v1"] = ArchEntry(mobilenet.mobilenet_v1, help="MobileNetV1 (width via width_mult=, default 1.0)")
ARCHS["mobilenet_v2"] = ArchEntry(mobilenet.mobilenet_v2, help="MobileNetV2 (width via width_mult=, default 1.0)")


def list_archs() -> List[str]:
    """The registered architecture names."""
    return ARCHS.names()


def get_arch(arch: str) -> ArchEntry:
    if not isinstance(arch, str) or arch.strip().lower() not in ARCHS:
        raise ValueError(ARCHS.unknown(arch))
    return ARCHS[arch.strip().lower()]


def build_model(
    arch: str,
    conv: str | ConvSpec = "static",
    placement: str | Placement = "paper",
    num_classes: int = 1000,
    in_chans: int = 3,
    init: str = "classic",
    bn_gamma: float | str | None = "auto",
    dropout: float | None = None,
    **kw: Any,
) -> nn.Module:
    """Build ``arch`` with ``num_classes`` outputs and ``in_chans`` input channels, initialise it with
    ``init`` (:mod:`.init`), then make the convs chosen by ``placement`` the operator ``conv``.

    ``bn_gamma``: initial BatchNorm gamma; ``"auto"`` = the operator's ``default_bn_gamma`` (0.5 for
    ``pedconv``, whose authors' release sets every BN gamma to 0.5) or, when that is None, the init
    scheme's value; a number forces it; None keeps the init scheme's value.
    Extra keywords go to the architecture (``width_mult=`` for MobileNets, ``dropout=``,
    ``zero_init_residual=`` for ResNets ...). Bad names raise ValueError listing the valid ones.
    ``dropout``: dropout probability before the classifier for every arch (None keeps the arch's own,
    see :func:`set_classifier_dropout`).
    """
    entry = get_arch(arch)
    spec = parse_spec(conv)
    pl = parse_placement(placement)
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    kwargs = {**entry.kwargs, **kw}
    try:
        model = entry.builder(num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as exc:
        raise ValueError(f"bad keyword for arch {arch!r}: {exc}") from None
    init_weights(model, init)
    if bn_gamma == "auto":
        bn_gamma = operator_class(spec).default_bn_gamma
    if bn_gamma is not None:
        if isinstance(bn_gamma, bool) or not isinstance(bn_gamma, (int, float)):
            raise ValueError(f"bn_gamma must be a number, 'auto' or None, got {bn_gamma!r}")
        set_bn_gamma(model, float(bn_gamma))
    if dropout is not None:
        set_classifier_dropout(model, dropout)
    return convert_model(model, spec, pl)


def set_classifier_dropout(model: nn.Module, p: float) -> nn.Module:
    """Use dropout ``p`` before the classifier: the model's own nn.Dropout layers get ``p``; a model
    without one (ResNets) gets dropout on the input of its last nn.Linear through a forward pre-hook,
    so parameter names (and checkpoints) stay those of the plain architecture."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p!r}")
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    for module in dropouts:
        module.p = p
    if not dropouts and p > 0:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("dropout needs a classifier nn.Linear; this model has none")
        linears[-1].register_forward_pre_hook(
            lambda module, args: (F.dropout(args[0], p, module.training), *args[1:])
        )
    return model
