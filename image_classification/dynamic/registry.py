"""Operator registry and the one parser of operator spec strings.

A spec names an operator and, optionally, options: ``name[:key=value[,key=value...]]``, e.g.
``pedconv``, ``pedconv:rank=4,components=phi+psi,sampling=learned``, ``dcd:blocks=2``,
``dyconv:k=4``, ``condconv:k=8``, ``involution``, ``static``.

Every operator is a drop-in for :class:`torch.nn.Conv2d`: it is constructed with the same
arguments (``in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias``)
plus its own keyword options, which are declared here with a type and a default so that specs are
validated in one place and errors list the valid choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Type

import torch.nn as nn

from ..named_registry import NamedRegistry
from .protocol import ForeignLayout, OperatorProtocol
from .spec import ConvSpec, LiveChoices, Option

__all__ = [
    "Option",
    "LiveChoices",
    "ConvSpec",
    "OPERATORS",
    "register_operator",
    "unregister_operator",
    "operator_class",
    "find_foreign_layout",
    "implied_spec",
    "operator_name",
    "parse_spec",
    "list_operators",
    "build_conv",
    "conv_from_static",
]


@dataclass(frozen=True)
class _Entry:
    cls: Any  # an nn.Module subclass deriving from OperatorProtocol (typing has no intersection type)
    options: Mapping[str, Option]
    help: str


OPERATORS: NamedRegistry[_Entry] = NamedRegistry("operator")


def register_operator(
    name: str, options: Optional[Mapping[str, Option]] = None, help: str = ""
) -> Callable[[Type[nn.Module]], Type[nn.Module]]:
    """Class decorator: register ``cls`` under ``name`` with its declared spec options.

    ``cls`` must be an ``nn.Module`` deriving from :class:`~.protocol.OperatorProtocol` (dynamic
    operators do through :class:`~.base.DynamicConv2d`): its hooks are all the rest of the project
    knows about it.
    """

    def decorate(cls: Type[nn.Module]) -> Type[nn.Module]:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module) and issubclass(cls, OperatorProtocol)):
            raise TypeError(f"operator {name!r}: {cls!r} must be an nn.Module deriving from OperatorProtocol "
                            "(e.g. a DynamicConv2d)")
        OPERATORS.register(name, _Entry(cls, dict(options or {}), help or (cls.__doc__ or "").strip().split("\n")[0]))
        cls.registered_name = name  # the class carries its name and option schema (spec.check_options reads them)
        cls.spec_options = OPERATORS[name].options
        return cls

    return decorate


def unregister_operator(name: str) -> None:
    """Remove operator ``name`` from the registry (tests that register a temporary operator)."""
    OPERATORS.unregister(name)


def list_operators() -> Sequence[str]:
    return OPERATORS.names()


def operator_class(spec: str | ConvSpec) -> Any:
    """The registered class of the operator named by ``spec`` (its hooks: :mod:`.protocol`)."""
    return OPERATORS[parse_spec(spec).name].cls


def find_foreign_layout(state_dict: Mapping[str, Any]) -> Optional[ForeignLayout]:
    """The :class:`~.protocol.ForeignLayout` of a registered operator that ``state_dict`` is in, or None."""
    for name in list_operators():
        for layout in getattr(OPERATORS[name].cls, "foreign_layouts", ()):
            if layout.detect(state_dict):
                return layout
    return None


def operator_name(module: nn.Module) -> str:
    """The registered name of ``module``'s operator class (its class name when it is not registered)."""
    for name, entry in OPERATORS.items():
        if type(module) is entry.cls:
            return name
    return type(module).__name__


def implied_spec(state_dict: Mapping[str, Any]) -> Optional[str]:
    """The operator spec a state dict in a foreign layout implies when its checkpoint names none, or None."""
    layout = find_foreign_layout(state_dict)
    return None if layout is None else layout.implied_spec


def parse_spec(spec: str | ConvSpec, **overrides: Any) -> ConvSpec:
    """Parse ``name[:k=v,...]`` into a :class:`ConvSpec`; unknown names or options raise ValueError."""
    if isinstance(spec, ConvSpec):
        name, given = spec.name, dict(spec.options)
    else:
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"empty operator spec; valid operators: {', '.join(list_operators())}")
        name, _, rest = spec.strip().partition(":")
        name = name.strip().lower()
        entry = OPERATORS.lookup(name)
        given = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, sep, text = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep:
                raise ValueError(f"option {item!r} of operator {name!r} must be written key=value")
            if key not in entry.options:
                valid = ", ".join(sorted(entry.options)) or "(none)"
                raise ValueError(f"unknown option {key!r} for operator {name!r}; valid options: {valid}")
            if key in given:
                raise ValueError(f"option {key!r} of operator {name!r} is given twice in {spec.strip()!r}; "
                                 "give it once")
            given[key] = entry.options[key].parse(name, key, text.strip())
    entry = OPERATORS.lookup(name)
    for key, value in overrides.items():
        if key not in entry.options:
            valid = ", ".join(sorted(entry.options)) or "(none)"
            raise ValueError(f"unknown option {key!r} for operator {name!r}; valid options: {valid}")
        entry.options[key].check(name, key, value)
        given[key] = value
    options = {key: given.get(key, opt.default) for key, opt in entry.options.items()}
    return ConvSpec(name, options, {key: opt.default for key, opt in entry.options.items()})


def build_conv(
    spec: str | ConvSpec,
    in_channels: int,
    out_channels: int,
    kernel_size: int | Tuple[int, int],
    stride: int | Tuple[int, int] = 1,
    padding: int | Tuple[int, int] = 0,
    dilation: int | Tuple[int, int] = 1,
    groups: int = 1,
    bias: bool = True,
    **overrides: Any,
) -> nn.Module:
    """Build the operator named by ``spec`` with nn.Conv2d's constructor arguments."""
    parsed = parse_spec(spec, **overrides)
    cls = OPERATORS[parsed.name].cls
    return cls(
        in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
        groups=groups, bias=bias, **parsed.options,
    )


def conv_from_static(spec: str | ConvSpec, conv: nn.Conv2d, **overrides: Any) -> nn.Module:
    """Replace a static ``nn.Conv2d`` by the operator ``spec`` with the same geometry.

    The static weight (and bias) become the operator's base weight where the operator has one
    (``load_static_weight``), so torchvision's static checkpoints serve as base weights.
    """
    if conv.padding_mode != "zeros":
        raise ValueError(f"dynamic operators support padding_mode='zeros' only, got {conv.padding_mode!r}")
    if isinstance(conv.padding, str):
        raise ValueError(f"string padding {conv.padding!r} is not supported by dynamic operators")
    parsed = parse_spec(spec, **overrides)
    return OPERATORS[parsed.name].cls.from_static(conv, **parsed.options)
