"""Turn any CNN dynamic: replace its ``nn.Conv2d`` modules by an operator under a placement policy.

Placement strings
-----------------
A placement is a ``+``-joined set of tokens (order irrelevant, case-insensitive)::

    paper                   every conv except the stem, the shortcut (ResNet ``downsample``) convs
                            and squeeze-excitation convs; classifier static  (the default; the
                            authors' release for ResNets, PEDConv, BMVC 2021, Table 1)
    all                     every conv except the stem (shortcut and SE convs included)
    none                    no conv (use with ``+cls`` for a dynamic classifier only)
    pointwise / depthwise / full
                            keep only 1x1 convs / depthwise convs (groups == in_channels) / the
                            other kxk convs of the scope; several may be joined
                            (pedconv Table 5c, DCD Table 3b)
    shallow / deep          keep only the first / second half of the network, halves taken over
                            the network's blocks (residual, inverted-residual, MBConv or
                            depthwise-separable blocks, in forward order; the shallow half is the
                            first floor(n/2) blocks; pedconv Table 5d)
    inblock                 keep only convs inside a block (residual, inverted-residual, MBConv,
                            depthwise-separable): leaves out convs between blocks, e.g. the 1x1
                            head conv of MobileNetV2/EfficientNet before the classifier; joins the
                            others (``deep+inblock``: EfficientNet-B0's last three stages, the
                            CondConv paper's EfficientNet placement)
    last                    keep only the last full k x k conv of each block: one per residual block,
                            where RedNet puts Involution (the 3x3 of a bottleneck; the second conv of
                            a basic block, as the CondConv/Involution report, Sec. 3.2), so that no two
                            input-generated kernels follow each other without a static conv between
    stem, shortcut, se      also convert the stem conv / the shortcut convs / the SE convs
    cls                     also make the classifier (the last nn.Linear) dynamic (DCD 'CLS'):
                            the operator's ``dynamic_classifier`` hook (DCD: ``DCDLinear``; by
                            default the classifier runs as the operator on a 1x1 conv of a 1x1 map)
    share                   operators with ``shares_generator`` (PEDConv): the convs of one residual
                            block share one generator (PEDConv, BMVC 2021, Appendix D, Table 2)

Examples: ``paper``, ``pointwise``, ``depthwise``, ``pointwise+depthwise``, ``deep``, ``all+se``,
``pointwise+cls``, ``paper+share``, ``none+cls``, ``deep+inblock``, ``paper+last``.

Operator-specific conversion goes through the operator's hooks (:mod:`image_classification.dynamic.protocol`):
``site_options(options, conv, block)`` returns per-conv option overrides (or None to leave that conv
static; DCD's released variant picks the sizing rule of the enclosing block), ``after_conversion``
runs once after the replacement (CondConv's ``routing=block``: one routing function per block).

Convs are classified by structure, so the same conversion works on any torchvision CNN (a
detection backbone, a user ``nn.Sequential``): the stem is the first ``nn.Conv2d`` in registration
order, shortcut convs live under a module named ``downsample`` or ``shortcut``, SE convs under a
``SqueezeExcitation`` module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional, Tuple, Type

import torch.nn as nn

from ..dynamic.base import DynamicConv2d
from ..dynamic.protocol import LinearAsConv, OperatorProtocol
from ..dynamic.registry import ConvSpec, conv_from_static, list_operators, operator_class, parse_spec
from .module_utils import set_module

__all__ = [
    "PLACEMENT_TOKENS",
    "ConvSite",
    "LinearAsConv",
    "Placement",
    "conv_sites",
    "convert_model",
    "parse_placement",
    "record_build",
    "select_convs",
]

SCOPES = ("paper", "all", "none")
TYPES = ("pointwise", "depthwise", "full")
DEPTHS = ("shallow", "deep")
EXTRAS = ("inblock", "last", "stem", "shortcut", "se", "cls", "share")
PLACEMENT_TOKENS = SCOPES + TYPES + DEPTHS + EXTRAS

_BLOCK_CLASS_NAMES = {
    "BasicBlock", "Bottleneck", "InvertedResidual", "MBConv", "FusedMBConv", "DepthwiseSeparable",
}
_SE_CLASS_NAMES = {"SqueezeExcitation", "SELayer", "SEModule"}
_SHORTCUT_NAMES = {"downsample", "shortcut"}


@dataclass(frozen=True)
class Placement:
    """A parsed placement: scope, conv types kept, depth half, and extras."""

    scope: str = "paper"
    types: FrozenSet[str] = frozenset()
    depth: Optional[str] = None
    extras: FrozenSet[str] = frozenset()

    def __str__(self) -> str:
        tokens = [self.scope] if (self.scope != "paper" or not (self.types or self.depth)) else []
        tokens += [t for t in TYPES if t in self.types]
        tokens += [self.depth] if self.depth else []
        tokens += [t for t in EXTRAS if t in self.extras]
        return "+".join(tokens)


def parse_placement(placement: str | Placement) -> Placement:
    """Parse a placement string (see the module docstring); unknown tokens raise ValueError."""
    if isinstance(placement, Placement):
        return placement
    if not isinstance(placement, str) or not placement.strip():
        raise ValueError(f"empty placement; valid tokens: {', '.join(PLACEMENT_TOKENS)}")
    tokens = [t.strip().lower() for t in placement.split("+") if t.strip()]
    bad = [t for t in tokens if t not in PLACEMENT_TOKENS]
    if bad:
        raise ValueError(
            f"unknown placement token {bad[0]!r} in {placement!r}; valid tokens: {', '.join(PLACEMENT_TOKENS)}"
        )
    scopes = [t for t in tokens if t in SCOPES]
    depths = [t for t in tokens if t in DEPTHS]
    if len(set(scopes)) > 1:
        raise ValueError(f"placement {placement!r} names more than one of {'/'.join(SCOPES)}")
    if len(set(depths)) > 1:
        raise ValueError(f"placement {placement!r} names both shallow and deep")
    types = frozenset(t for t in tokens if t in TYPES)
    if scopes == ["none"] and (types or depths):
        raise ValueError(f"placement {placement!r}: 'none' cannot be combined with conv types or depths")
    return Placement(
        scope=scopes[0] if scopes else "paper",
        types=types,
        depth=depths[0] if depths else None,
        extras=frozenset(t for t in tokens if t in EXTRAS),
    )


@dataclass(frozen=True)
class ConvSite:
    """One ``nn.Conv2d`` of a model and how the placement policies see it."""

    name: str
    kind: str  # stem | shortcut | se | pointwise | depthwise | full
    block: str  # name of the enclosing block ("" for none)
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, int]
    groups: int


def _is_static_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and not isinstance(module, DynamicConv2d)


def conv_sites(model: nn.Module) -> List[ConvSite]:
    """Every static conv of ``model`` (dynamic operators are not entered), classified, in order."""
    modules: Dict[str, nn.Module] = {}
    sites: List[ConvSite] = []
    skip: List[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in skip):
            continue
        modules[name] = module
        if isinstance(module, (DynamicConv2d, LinearAsConv)):
            skip.append(name)
            continue
        if not _is_static_conv(module):
            continue
        parts = name.split(".")
        ancestors = [modules.get(".".join(parts[:i]), None) for i in range(1, len(parts))]
        block = ""
        for i in range(len(parts) - 1, 0, -1):
            anc = modules.get(".".join(parts[:i]))
            if anc is not None and type(anc).__name__ in _BLOCK_CLASS_NAMES:
                block = ".".join(parts[:i])
                break
        if not sites:
            kind = "stem"
        elif any(type(a).__name__ in _SE_CLASS_NAMES for a in ancestors if a is not None):
            kind = "se"
        elif any(p in _SHORTCUT_NAMES for p in parts[:-1]) or parts[-1] in _SHORTCUT_NAMES:
            kind = "shortcut"
        else:
            kind = ""
        site = ConvSite(name, kind, block or name, module.in_channels, module.out_channels,
                        tuple(module.kernel_size), module.groups)
        if not kind:
            site = ConvSite(name, _geometry(site), *dataclasses.astuple(site)[2:])
        sites.append(site)
    return sites


def _geometry(site: ConvSite) -> str:
    if site.groups == site.in_channels and site.groups > 1:
        return "depthwise"
    return "pointwise" if site.kernel_size == (1, 1) else "full"


def _depth_halves(sites: List[ConvSite]) -> Dict[str, str]:
    """Block name -> 'shallow' | 'deep'; halves over the blocks holding a paper-eligible conv.

    The first floor(n/2) such blocks are shallow. The stem is shallow; any other conv outside
    those blocks takes the half of the next such block (deep when none follows).
    """
    order: List[str] = []
    for site in sites:
        if site.kind in TYPES and site.block not in order:
            order.append(site.block)
    label = {block: ("shallow" if i < len(order) // 2 else "deep") for i, block in enumerate(order)}
    for idx, site in enumerate(sites):
        if site.block in label:
            continue
        following = next((s.block for s in sites[idx + 1:] if s.block in order), None)
        label[site.block] = "shallow" if site.kind == "stem" else (label[following] if following else "deep")
    return label


def select_convs(model: nn.Module, placement: str | Placement = "paper") -> List[str]:
    """Names of the convs that ``placement`` makes dynamic in ``model`` (in order)."""
    pl = parse_placement(placement)
    sites = conv_sites(model)
    if pl.scope == "none":
        chosen = set()
    else:
        base = {"pointwise", "depthwise", "full"}
        if pl.scope == "all":
            base |= {"shortcut", "se"}
        keep_types = pl.types or set(TYPES)
        chosen = {s.name for s in sites if s.kind in base and _geometry(s) in keep_types}
    for extra in ("stem", "shortcut", "se"):
        if extra in pl.extras:
            chosen |= {s.name for s in sites if s.kind == extra}
    if pl.depth is not None:
        halves = _depth_halves(sites)
        chosen = {s.name for s in sites if s.name in chosen and halves[s.block] == pl.depth}
    if "inblock" in pl.extras:
        chosen = {s.name for s in sites if s.name in chosen and s.block != s.name}
    if "last" in pl.extras:
        last = {s.block: s.name for s in sites if s.name in chosen and s.block != s.name and _geometry(s) == "full"}
        chosen = set(last.values())
    return [s.name for s in sites if s.name in chosen]


def _last_linear(model: nn.Module) -> Tuple[str, nn.Linear]:
    found = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    if not found:
        raise ValueError(f"placement '+cls' needs an nn.Linear classifier; {type(model).__name__} has none")
    return found[-1]


def _share_generators(cls: Type[OperatorProtocol], model: nn.Module, names: List[str], sites: List[ConvSite]) -> int:
    """Placement ``+share``: the operator's ``share_generators`` for the converted convs of each block."""
    block_of = {s.name: s.block for s in sites}
    groups: Dict[str, List[nn.Module]] = {}
    for name in names:
        groups.setdefault(block_of[name], []).append(model.get_submodule(name))
    shared = 0
    for convs in groups.values():
        if len(convs) > 1:
            cls.share_generators(convs)
            shared += 1
    return shared


def _site_overrides(spec: ConvSpec, model: nn.Module, site: ConvSite) -> Optional[Dict[str, Any]]:
    """Per-conv option overrides from the operator's ``site_options`` hook (None: keep the conv static)."""
    block = model.get_submodule(site.block) if site.block != site.name else None
    return operator_class(spec).site_options(spec.options, model.get_submodule(site.name), block)


def convert_model(
    model: nn.Module, conv: str | ConvSpec = "static", placement: str | Placement = "paper"
) -> nn.Module:
    """Replace the convs selected by ``placement`` by the operator ``conv`` (in place; returns model).

    Each replaced conv goes through :func:`conv_from_static`, so its static weight becomes the
    operator's base weight. ``conv="static"`` leaves the model as it is (the placement is still
    validated, nothing is recorded). With a dynamic operator the replaced modules' names are recorded as
    ``model.dynamic_convs``.
    """
    spec = parse_spec(conv)
    pl = parse_placement(placement)
    cls = operator_class(spec)
    if "share" in pl.extras and not cls.shares_generator:
        sharing = ", ".join(name for name in list_operators() if operator_class(name).shares_generator)
        raise ValueError(f"placement '+share' applies to {sharing or 'no registered operator'} only, not {spec.name!r}")
    sites = conv_sites(model)
    names = select_convs(model, pl)
    if spec.is_static:
        return model
    site_of = {s.name: s for s in sites}
    # decided on the static model, before any conv of a block is replaced
    overrides: Dict[str, Dict[str, Any]] = {}
    for name in names:
        options = _site_overrides(spec, model, site_of[name])
        if options is not None:
            overrides[name] = options
    names = list(overrides)
    for name, options in overrides.items():
        static = model.get_submodule(name)
        assert isinstance(static, nn.Conv2d)  # select_convs names static convs only
        set_module(model, name, conv_from_static(spec, static, **options))
    cls.after_conversion(spec, model, list(names), sites)
    if "cls" in pl.extras:
        cls_name, linear = _last_linear(model)
        classifier = cls.dynamic_classifier(spec, linear)
        for hook in linear._forward_pre_hooks.values():  # e.g. the dropout of set_classifier_dropout
            classifier.register_forward_pre_hook(hook)
        set_module(model, cls_name, classifier)
        names = names + [cls_name]
    if "share" in pl.extras:
        _share_generators(cls, model, [n for n in names if n in {s.name for s in sites}], sites)
    record_build(model, dynamic_convs=list(names))
    return model


def record_build(model: nn.Module, **fields: Any) -> None:
    """Record how ``model`` was built as plain attributes (``dynamic_convs``, ``arch``, ``conv``...): the
    checkpoints, counters and tables read them back (``getattr(model, "dynamic_convs", [])``)."""
    for name, value in fields.items():
        setattr(model, name, value)
