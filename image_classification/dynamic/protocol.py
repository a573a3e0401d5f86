"""What the rest of the project asks of an operator: the hooks every registered operator class carries.

An operator is one module of this package: a class registered with
:func:`~.registry.register_operator` that derives from :class:`OperatorProtocol` (through
:class:`~.base.DynamicConv2d` for dynamic operators). Everything outside ``dynamic/`` (model
conversion, MAC counting, checkpoint loading, ``build_model``) reads the operator's knowledge from
these hooks and never tests an operator's name, so adding an operator is one file in ``dynamic/peers/``
plus its import line in ``peers/__init__.py``. Every hook has a default that is right for a plain dynamic conv:

=============================  =====================================================================
hook                           asked by / default
=============================  =====================================================================
``macs(input_shape)``          MAC counter (``image_classification.measurement.macs``): the layer's own figure
                               for one forward of an input of ``input_shape`` (children not entered).
                               Optional; without it the counter charges the static conv of the
                               geometry + every Conv2d/Linear the layer runs + ``synthesis_macs()``.
``synthesis_macs()``           the generic count above: multiply-adds that build the per-sample
                               weight from generated factors (default 0).
``default_bn_gamma``           ``build_model(bn_gamma="auto")``: initial gamma of every BatchNorm,
                               None = the init scheme's value.
``default_placement``          ``main.py`` without ``--placement``: where the operator goes (default
                               ``paper``; Involution ``paper+last``, RedNet's one per block).
``site_options(...)``          ``convert_model``: per-conv option overrides (None keeps a conv static).
``after_conversion(...)``      ``convert_model``: called once after the convs are replaced (block-level
                               sharing such as CondConv's ``routing=block``).
``shares_generator`` /         placement ``+share``: whether and how the converted convs of one block
``share_generators(convs)``    share one generator (PEDConv, Appendix D).
``dynamic_classifier(...)``    placement ``+cls``: the dynamic replacement of the classifier
                               ``nn.Linear`` (default: the operator as a 1x1 conv, :class:`LinearAsConv`).
``foreign_layouts``            checkpoint loading: state-dict layouts of other code bases (the authors'
                               releases) that this operator loads, as :class:`ForeignLayout` entries.
``fold_output_affine(s, t)``   BatchNorm folding (optional method): fold a following per-channel
                               affine map exactly, or raise ValueError(reason).
``export_route()``             ONNX/TorchScript export: how the layer runs with a dynamic batch axis
                               (:class:`ExportRoute`); default: refused.
``analysis_coefficients(x)``   coefficient analysis: the generated coefficients per sample, by name
                               (samples x entries); default None (nothing to analyse).
``per_sample_weight`` /        weight-variation analysis: whether ``dynamic_weight(x)`` is one weight
``weight_moments(x)``          per sample, and optionally its moments computed without materialising
                               it (default None: the analysis sums ``dynamic_weight`` itself).
=============================  =====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Protocol, Sequence, Tuple, cast

import torch
import torch.nn as nn

from .functional import per_sample_conv2d
from .spec import ConvSpec, Option

__all__ = ["ExportRoute", "ForeignLayout", "LinearAsConv", "OperatorProtocol", "PerSampleUnfoldConv2d"]


@dataclass(frozen=True)
class ForeignLayout:
    """A state-dict layout of another code base that an operator loads after converting it.

    ``detect(state_dict)``: whether a (prefix-free) state dict is in this layout;
    ``convert(state_dict)``: the state dict renamed to this project's parameter names (raises
    ValueError/KeyError/RuntimeError when it cannot); ``accepts(spec)``: whether a model built with the
    parsed operator ``spec`` takes the converted weights; ``mismatch``: the one-line error when it does
    not, a format string with ``{label}`` (the checkpoint) and ``{conv}`` (the model's operator);
    ``implied_spec``: the operator to build when a checkpoint in this layout names none (None: the
    layout alone does not determine the model); ``foreign_arch(arch)``: whether an ``arch`` field of
    such a checkpoint is the other code base's own name, not to be compared with this project's.
    """

    description: str
    detect: Callable[[Mapping[str, Any]], bool]
    convert: Callable[[Mapping[str, Any]], Dict[str, Any]]
    accepts: Callable[[ConvSpec], bool]
    mismatch: str
    implied_spec: Optional[str] = None
    foreign_arch: Callable[[str], bool] = lambda arch: False


class _PerSampleWeightConv(Protocol):
    """What :class:`PerSampleUnfoldConv2d` reads of the operator it runs."""

    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int

    def dynamic_weight(self, x: torch.Tensor) -> torch.Tensor: ...


class PerSampleUnfoldConv2d(nn.Module):
    """Runs an operator's per-sample weight (``dynamic_weight(x)``) by unfold + batched matmul.

    The generic dynamic-batch export route for operators whose own fast path is a grouped conv over the
    batch (kernel mixtures, DCD's depthwise form). The wrapped operator keeps its parameters (``op.*``);
    the bias is ``op.dynamic_bias(x)`` where the operator has one (per sample), else ``op.bias``.
    """

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = cast(_PerSampleWeightConv, self.op)
        weight = op.dynamic_weight(x)
        bias_fn = getattr(op, "dynamic_bias", None)
        bias = bias_fn(x) if callable(bias_fn) else getattr(op, "bias", None)
        return per_sample_conv2d(x, weight, bias, op.stride, op.padding, op.dilation, op.groups, method="unfold")


@dataclass(frozen=True)
class ExportRoute:
    """How one layer exports: set its ``path``, wrap it in an ``adapter``, keep it, or ``refuse`` (reason)."""

    path: Optional[str] = None
    adapter: Optional[Callable[[nn.Module], nn.Module]] = None
    refuse: Optional[str] = None
    label: str = "as trained"


class LinearAsConv(nn.Module):
    """A classifier ``nn.Linear`` run as a dynamic 1x1 conv on a 1x1 map (DCD 'CLS' for any operator)."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        out = self.conv(x.reshape(-1, x.shape[-1], 1, 1))
        return out.reshape(*lead, out.shape[1])


class OperatorProtocol:
    """Mixin of every registered operator class: the hooks of the module docstring, with their defaults."""

    #: initial gamma of every BatchNorm under ``build_model(bn_gamma="auto")``; None keeps the init's value
    default_bn_gamma: ClassVar[Optional[float]] = None
    #: the placement ``main.py`` uses when neither ``--placement``, a recipe nor a checkpoint names one
    default_placement: ClassVar[str] = "paper"
    #: foreign state-dict layouts this operator loads (checkpoint loading tries each one's ``detect``)
    foreign_layouts: ClassVar[Tuple[ForeignLayout, ...]] = ()
    #: whether placement ``+share`` applies (:meth:`share_generators`)
    shares_generator: ClassVar[bool] = False
    #: whether ``dynamic_weight(x)`` (when defined) is one B x C_out x C_in/g x kh x kw weight per sample
    per_sample_weight: ClassVar[bool] = True
    #: the registered name and spec options (:func:`~.registry.register_operator` sets both)
    registered_name: ClassVar[str] = ""
    spec_options: ClassVar[Mapping[str, Option]] = {}

    def analysis_coefficients(self, x: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
        """The coefficients generated for input ``x``, each samples x entries, by name; None: none to analyse."""
        return None

    def weight_moments(self, x: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(sum_b W(x_b), sum_b W(x_b)^2, per-sample ||W(x_b)||_F)`` in float64 without materialising the
        batch of weights, or None (the analysis then sums ``dynamic_weight`` chunk by chunk)."""
        return None

    def export_route(self) -> ExportRoute:
        """Export with a dynamic batch axis: how this layer runs there (default: refused)."""
        return ExportRoute(refuse=f"operator {type(self).__name__} declares no export path (no export_route method)")

    def synthesis_macs(self) -> int:
        """MACs of building the per-sample weight from generated factors (generic MAC count only)."""
        return 0

    @classmethod
    def site_options(cls, options: Mapping[str, Any], conv: nn.Conv2d,
                     block: Optional[nn.Module]) -> Optional[Dict[str, Any]]:
        """Option overrides for converting ``conv`` (inside ``block``, None at top level); None keeps it static."""
        return {}

    @classmethod
    def after_conversion(cls, spec: ConvSpec, model: nn.Module, converted: Sequence[str],
                         sites: Sequence[Any]) -> None:
        """Called once by ``convert_model`` after the convs named ``converted`` were replaced.

        ``sites`` are ``convert_model``'s conv sites of the static model, in registration order
        (attributes ``name``, ``block``, ``in_channels``...).
        """

    @classmethod
    def share_generators(cls, convs: Sequence[nn.Module]) -> None:
        """Placement ``+share``: make the converted convs of one block share one generator."""
        raise ValueError(f"operator class {cls.__name__} cannot share a generator between convs")

    @classmethod
    def from_static(cls, conv: nn.Conv2d, **options: Any) -> nn.Module:
        """This operator with ``conv``'s geometry, device and dtype and a spec's ``options``; the static weight
        (and bias) become its base weight where it has one (``load_static_weight``), so torchvision's static
        checkpoints serve as base weights (:func:`.registry.conv_from_static` calls it)."""
        # the mixin declares no constructor; every registered class is a module taking nn.Conv2d's arguments
        constructor = cast(Callable[..., nn.Module], cls)
        module = constructor(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                             padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                             bias=conv.bias is not None, **options)
        loader = getattr(module, "load_static_weight", None)
        if loader is not None:
            loader(conv.weight.detach(), None if conv.bias is None else conv.bias.detach())
        return module.to(device=conv.weight.device, dtype=conv.weight.dtype)

    @classmethod
    def dynamic_classifier(cls, spec: ConvSpec, linear: nn.Linear) -> nn.Module:
        """Placement ``+cls``: the dynamic replacement of the classifier ``linear`` (the static weights kept)."""
        conv = nn.Conv2d(linear.in_features, linear.out_features, 1, bias=linear.bias is not None)
        conv.weight.data.copy_(linear.weight.detach().reshape_as(conv.weight))
        if linear.bias is not None and conv.bias is not None:
            conv.bias.data.copy_(linear.bias.detach())
        return LinearAsConv(cls.from_static(conv.to(linear.weight.device, linear.weight.dtype), **spec.options))
