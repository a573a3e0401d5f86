"""Parameter and multiply-add (MAC) counting in the papers' convention.

MACs are counted per layer by forward hooks on one eval-mode forward at batch 1:

* ``nn.Conv2d``: ``H_out W_out C_out (C_in / groups) k_h k_w``;
* ``nn.Linear``: ``rows * in * out`` (``rows`` = all leading dims);
* a module with a ``macs(input_shape) -> int`` method (``input_shape`` = the shape of its input at
  batch 1): its own figure, its children are not entered. Every registered operator states its
  figure this way (or through the generic count below), with the formula in its docstring
  (``image_classification.dynamic``: the operator protocol, :mod:`image_classification.dynamic.protocol`);
* a dynamic operator (:class:`DynamicConv2d`) without ``macs``: the static conv of its geometry,
  plus every Conv2d/Linear it runs inside (its generator / dynamic branch, counted by the same
  hooks), plus its ``synthesis_macs()`` (the cost of building its per-sample weight).

BatchNorm, activations, pooling and element-wise products are not counted (as in the papers).
Submodules named ``infomax_decoder`` (training-only info-max decoders) are neither run in eval
mode nor counted, and are excluded from the deploy parameter count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Protocol, Sequence, Tuple, Union, cast

import torch
import torch.nn as nn

from ..dynamic.base import DynamicConv2d

__all__ = [
    "DECODER_NAME",
    "MacReport",
    "ParamCount",
    "conv_macs",
    "count_macs",
    "count_params",
    "linear_macs",
]

DECODER_NAME = "infomax_decoder"


@dataclass(frozen=True)
class ParamCount:
    deploy: int  # what inference needs (training-only decoders excluded)
    training: int  # every parameter the optimizer updates


def count_params(model: nn.Module) -> ParamCount:
    """Deploy and training parameter counts (shared parameters counted once)."""
    deploy = training = 0
    for name, p in model.named_parameters():
        training += p.numel()
        if DECODER_NAME not in name.split("."):
            deploy += p.numel()
    return ParamCount(deploy, training)


def conv_macs(in_channels: int, out_channels: int, kernel_size: Union[int, Sequence[int]], groups: int,
              out_hw: Sequence[int]) -> int:
    """MACs of a static conv producing an ``out_hw`` map: ``H W C_out (C_in/g) k_h k_w``."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    return int(out_hw[0]) * int(out_hw[1]) * out_channels * (in_channels // groups) * kh * kw


def linear_macs(in_features: int, out_features: int, rows: int = 1) -> int:
    return rows * in_features * out_features


@dataclass
class MacReport:
    total: int = 0
    layers: Dict[str, int] = field(default_factory=dict)


def _units(model: nn.Module) -> List[Tuple[str, nn.Module, str]]:
    units: List[Tuple[str, nn.Module, str]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if name == DECODER_NAME:
                continue
            if callable(getattr(child, "macs", None)):
                units.append((full, child, "custom"))
            elif isinstance(child, DynamicConv2d):
                units.append((full, child, "dynamic"))
                walk(child, full)
            elif isinstance(child, nn.Conv2d):
                units.append((full, child, "conv"))
            elif isinstance(child, nn.Linear):
                units.append((full, child, "linear"))
            else:
                walk(child, full)

    walk(model, "")
    return units


class _CountsOwnMacs(Protocol):
    """A module that counts its own multiply-adds (a ``macs(input_shape)`` method)."""

    def macs(self, input_shape: Tuple[int, ...]) -> int: ...


def _unit_macs(module: nn.Module, kind: str, inp: torch.Tensor, out: torch.Tensor) -> int:
    """Multiply-adds of one unit of :func:`_units` (``kind`` says which rule applies)."""
    if kind == "custom":
        return int(cast(_CountsOwnMacs, module).macs(tuple(inp.shape)))  # _units checked it has one
    if kind == "linear":
        assert isinstance(module, nn.Linear)
        return linear_macs(module.in_features, module.out_features, inp.numel() // max(1, inp.shape[-1]))
    assert isinstance(module, (nn.Conv2d, DynamicConv2d))
    macs = out.shape[0] * conv_macs(module.in_channels, module.out_channels, module.kernel_size, module.groups,
                                    out.shape[-2:])
    if isinstance(module, DynamicConv2d):  # kind "dynamic"
        macs += out.shape[0] * int(module.synthesis_macs())
    return macs


def count_macs(model: nn.Module, input_size: Union[int, Sequence[int]] = 224, in_chans: int = 3) -> MacReport:
    """MACs of one image through ``model`` (eval mode, no grad); per-layer figures in ``layers``.

    ``input_size`` is an int (square) or ``(H, W)`` or ``(C, H, W)``.
    """
    shape: Tuple[int, ...]
    if isinstance(input_size, int):
        shape = (in_chans, input_size, input_size)
    elif len(input_size) == 2:
        shape = (in_chans, *input_size)
    else:
        shape = tuple(input_size)
    report = MacReport()
    handles = []

    def make_hook(name: str, kind: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            macs = _unit_macs(module, kind, inputs[0], output)
            report.layers[name] = report.layers.get(name, 0) + macs
            report.total += macs
        return hook

    for name, module, kind in _units(model):
        handles.append(module.register_forward_hook(make_hook(name, kind)))
    was_training = model.training
    param = next(model.parameters(), None)
    x = torch.zeros(1, *shape, device=None if param is None else param.device,
                    dtype=torch.float32 if param is None else param.dtype)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return report
