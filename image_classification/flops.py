"""Parameter and multiply-add (MAC) counting in the papers' convention.

MACs are counted per layer by forward hooks on one eval-mode forward at batch 1:

* ``nn.Conv2d``: ``H_out W_out C_out (C_in / groups) k_h k_w``;
* ``nn.Linear``: ``rows * in * out`` (``rows`` = all leading dims);
* DCD's ``DCDLinear``: ``in * out + L^2`` plus its hooked dynamic-branch/P/Q linears;
* a module with a ``macs(input_shape) -> int`` method (``input_shape`` = ``(1, C, H, W)``): its own
  figure, its children are not entered;
* a dynamic operator (:class:`DynamicConv2d`) without ``macs``: the static conv of its geometry,
  plus every Conv2d/Linear it runs inside (its generator / dynamic branch, counted by the same
  hooks), plus the cost of applying the generated factors to the weight, per operator:

  - ``pedconv`` (PEDConv, BMVC 2021, Sec. 3, "Complexity analysis"):
    ``H W C_out C_in k^2 + (2 C_in + C_out + k^2) C_in / r + 2 C_out C_in k^2``; the middle term is
    the generator (counted by the hooks, ``C_in / g`` for the input-side head of grouped convs),
    the last one the weight scaling, ``2 R C_out C_in/g k^2`` for rank R (this reproduces the
    paper's rank 4/8 rows, Table 5b);
  - kernel mixtures (``dyconv``, ``condconv``): ``K C_out C_in/g k^2`` for the aggregation;
  - ``dcd`` (Li et al. 2021, Eq. 6-8): synthesis of the per-sample dynamic residual
    ``P Phi Q^T``: ``L^2 C_in + C_out L C_in / n_b`` (``n_b`` diagonal blocks; joint form times
    ``L_k``); depthwise form: the per-sample ``C x k^2`` weight ``C k^2 + C L_k^2 + C L_k k^2``
    (DCD Table 3b counts the residual's synthesis, not its application to activations);
  - other operators: no extra term.

BatchNorm, activations, pooling and element-wise products are not counted (as in the papers).
Submodules named ``infomax_decoder`` (PEDConv's training-only decoder) are neither run in eval
mode nor counted, and are excluded from the deploy parameter count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .dynamic.base import DynamicConv2d
from .dynamic.registry import OPERATORS

__all__ = [
    "DECODER_NAME",
    "MacReport",
    "ParamCount",
    "conv_macs",
    "count_macs",
    "count_params",
    "linear_macs",
    "pedconv_layer_macs",
    "pedconv_layer_params",
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


def pedconv_layer_macs(c_in: int, c_out: int, k: int, out_hw: Sequence[int], groups: int = 1, hidden: int = 0,
                       rank: int = 1, reduction: int = 16) -> int:
    """PEDConv, BMVC 2021, Sec. 3 complexity: ``HW C_out C_in k^2 + (2C_in + C_out + k^2) C_in/r + 2R C_out C_in k^2``.

    ``C_in / g`` replaces ``C_in`` in the conv, the input-side head and the scaling for grouped
    convs; ``hidden`` (default ``C_in // r``) is the generator bottleneck; rank R multiplies heads
    and scaling.
    """
    hidden = hidden or max(4, c_in // reduction)
    cin_g = c_in // groups
    generator = c_in * hidden + hidden * rank * (c_out + cin_g + k * k)
    return conv_macs(c_in, c_out, k, groups, out_hw) + generator + 2 * rank * c_out * cin_g * k * k


def pedconv_layer_params(c_in: int, c_out: int, k: int, groups: int = 1, hidden: int = 0, rank: int = 1,
                         reduction: int = 16) -> int:
    """Deploy parameters of one PEDConv layer (no conv bias): base weight + generator with biases."""
    hidden = hidden or max(4, c_in // reduction)
    heads = rank * (c_out + c_in // groups + k * k)
    return c_out * (c_in // groups) * k * k + c_in * hidden + hidden + hidden * heads + heads


def _operator_name(module: nn.Module) -> str:
    for name, entry in OPERATORS.items():
        if type(module) is entry.cls:
            return name
    return type(module).__name__


def _dcd_macs(module: DynamicConv2d) -> int:
    lam = bool(getattr(module, "use_lambda", True))
    phi = bool(getattr(module, "use_phi", True))
    kh, kw = module.kernel_size
    if getattr(module, "form", "channel") == "depthwise":
        lk = int(getattr(module, "latent_kernel", 1))
        return module.out_channels * kh * kw * lam + phi * module.out_channels * (lk * lk + lk * kh * kw)
    latent = int(getattr(module, "latent", 0))
    blocks = int(getattr(module, "num_blocks", 1))
    residual = latent * latent * module.in_channels + module.out_channels * latent * module.in_channels // blocks
    if getattr(module, "form", "channel") == "joint":
        residual *= int(getattr(module, "latent_kernel", 1))
    return residual * phi


def _application_macs(module: DynamicConv2d, out_hw: Sequence[int]) -> int:
    """Cost of applying generated factors / attention to the weight (see the module docstring)."""
    kh, kw = module.kernel_size
    weight = module.out_channels * (module.in_channels // module.groups) * kh * kw
    name = _operator_name(module)
    if name == "pedconv":
        return 2 * int(getattr(module, "rank", 1)) * weight
    if name == "dcd":
        return _dcd_macs(module)
    if hasattr(module, "num_kernels"):
        return int(module.num_kernels) * weight
    return 0


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
            elif type(child).__name__ == "DCDLinear":  # runs F.linear on its ``linear`` weight
                units.append((full, child, "dcdlinear"))
                for sub_name, sub in child.named_children():
                    if sub_name != "linear" and isinstance(sub, nn.Linear):
                        units.append((f"{full}.{sub_name}", sub, "linear"))
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


def _unit_macs(module: nn.Module, kind: str, inp: torch.Tensor, out: torch.Tensor) -> int:
    if kind == "custom":
        return int(module.macs(tuple(inp.shape)))
    if kind == "linear":
        return linear_macs(module.in_features, module.out_features, inp.numel() // max(1, inp.shape[-1]))
    if kind == "dcdlinear":  # W0 x plus the L x L fusion (P, Q and the dynamic branch are hooked)
        rows = inp.numel() // max(1, inp.shape[-1])
        latent = int(getattr(module, "latent", 0)) if getattr(module, "use_phi", False) else 0
        return rows * (module.in_features * module.out_features + latent * latent)
    macs = out.shape[0] * conv_macs(module.in_channels, module.out_channels, module.kernel_size, module.groups,
                                    out.shape[-2:])
    if kind == "dynamic":
        macs += out.shape[0] * _application_macs(module, out.shape[-2:])
    return macs


def count_macs(model: nn.Module, input_size: Union[int, Sequence[int]] = 224, in_chans: int = 3) -> MacReport:
    """MACs of one image through ``model`` (eval mode, no grad); per-layer figures in ``layers``.

    ``input_size`` is an int (square) or ``(H, W)`` or ``(C, H, W)``.
    """
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
