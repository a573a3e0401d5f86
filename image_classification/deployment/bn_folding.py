"""BatchNorm folding for deployment: ``fold_batchnorm(model)`` merges each eval-mode BatchNorm into the
(static or dynamic) convolution right before it.

In eval mode a BatchNorm is the per-channel affine map ``y -> scale * y + shift`` with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``. When a
convolution's output feeds that BatchNorm and nothing else, the pair is one convolution with rescaled
output filters and a bias:

* ``nn.Conv2d`` (and the registry's ``static``): :func:`torch.nn.utils.fusion.fuse_conv_bn_eval`.
* an operator with a ``fold_output_affine(scale, shift)`` method folds the map itself, exactly, or raises
  ``ValueError(reason)`` without changing anything (then the pair is left as it is, with the reason in
  the report). Every registered dynamic operator owns that method; one without it is left unfolded.

Which operators fold exactly (and why):

============== ======= ==========================================================================
operator       folds   reason
============== ======= ==========================================================================
static         yes     ``W *= scale``, ``b = scale * b + shift``
pedconv        yes     multiplicative (Eq. 2): ``W_base[o] *= scale_o`` commutes with gamma (see
                       :meth:`PEDConv2d.fold_output_affine` for the proof); additive: no (the scale
                       would multiply the sigmoid factor gamma)
pedconv_spatial yes    the same argument per location
odconv         yes     ``a_f`` and ``scale`` both act per output channel: ``W_i[o] *= scale_o``
dcd            yes     ``scale (Lambda W0 + P Phi Q^T) = Lambda (scale W0) + (scale P) Phi Q^T``
dyconv         yes     ``W_k *= scale``, ``b_k = scale b_k + shift``: the softmax weights sum to 1
condconv       no      sigmoid routing weights do not sum to 1, so the shift cannot become expert
                       biases (and the operator has no static bias)
involution     partly  with its ``C_in -> C_out`` projection (a static 1x1 conv) yes; without it no:
                       each output channel comes from a kernel shared by its channel group
============== ======= ==========================================================================

Pairs are found from the data flow, not from module names: the model is traced with :mod:`torch.fx`
(dynamic operators and the classifier wrappers are leaves), and a pair is a BatchNorm call whose only
input is a conv call with no other user, each module called once. A BatchNorm elsewhere (after a
residual sum, inside an operator's generator) is left alone. Operators may also fold BatchNorms inside
themselves (``fold_inner_batchnorm()``; ODConv's attention branch). A model ``torch.fx`` cannot trace is
returned unchanged with the reason in the report.

The folded model equals the original in eval mode (to float rounding); it is for inference only
(the BatchNorm statistics no longer update).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.fx
import torch.nn as nn
from torch import Tensor
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..dynamic.base import DynamicConv2d
from ..dynamic.functional import batchnorm_affine
from ..dynamic.registry import operator_name
from ..models.module_utils import set_module

__all__ = ["FoldReport", "batchnorm_affine", "fold_batchnorm"]


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did: folded ``conv + bn`` pairs, pairs left unfolded with the reason,
    BatchNorms folded inside operators, and a note when the model could not be traced."""

    folded: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    inner: int = 0
    note: str = ""

    def summary(self) -> str:
        text = f"folded {len(self.folded)} BatchNorm(s) into the conv before them"
        if self.inner:
            text += f", {self.inner} inside operators"
        if self.skipped:
            text += f"; left {len(self.skipped)}: " + "; ".join(f"{pair} ({why})" for pair, why in self.skipped[:3])
            if len(self.skipped) > 3:
                text += f"; ... {len(self.skipped) - 3} more"
        if self.note:
            text += f"; {self.note}"
        return text


def _folder(module: nn.Module) -> Optional[Callable[[Tensor, Tensor], None]]:
    own = getattr(module, "fold_output_affine", None)
    return own if callable(own) else None


# ---------------------------------------------------------------------------------------------------
# Finding conv -> BN pairs from the data flow
# ---------------------------------------------------------------------------------------------------
_OPERATOR_PACKAGE = DynamicConv2d.__module__.rpartition(".")[0]  # image_classification.dynamic


class _LeafTracer(torch.fx.Tracer):
    """Dynamic operators (and anything defined in this package's operator/model wrappers) are leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, DynamicConv2d) or type(m).__module__.startswith(_OPERATOR_PACKAGE):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, DynamicConv2d))


def _conv_bn_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    graph = _LeafTracer().trace(model)
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(node.target, str):  # a call_module target is its name
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs: List[Tuple[str, str]] = []
    for node in graph.nodes:
        if (node.op != "call_module" or not isinstance(node.target, str)
                or not isinstance(model.get_submodule(node.target), nn.BatchNorm2d)):
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        if (src.op != "call_module" or not isinstance(src.target, str)
                or not _is_conv(model.get_submodule(src.target))):
            continue
        if len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1:
            continue
        pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> FoldReport:
    """Fold every eval-mode BatchNorm that directly follows a conv into that conv, in place.

    The model must be in eval mode (the folded model equals it there). Each folded BatchNorm becomes
    ``nn.Identity``; a pair that cannot be folded exactly is left unchanged and listed with the reason
    in the returned :class:`FoldReport` (see the module docstring for the rules per operator).
    """
    if model.training:
        raise ValueError("fold_batchnorm: put the model in eval mode first (model.eval()); folding uses the "
                         "BatchNorm running statistics")
    report = FoldReport()
    try:
        pairs = _conv_bn_pairs(model)
    except Exception as exc:  # torch.fx cannot trace data-dependent Python control flow
        report.note = f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}); nothing folded"
        return report
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        assert isinstance(bn, nn.BatchNorm2d)  # _conv_bn_pairs pairs BatchNorm2d layers only
        label = f"{conv_name} + {bn_name}"
        if bn.num_features != conv.out_channels:
            report.skipped.append((label, "channel counts differ"))
            continue
        try:
            scale, shift = (t.detach() for t in batchnorm_affine(bn))
            if isinstance(conv, nn.Conv2d) and not isinstance(conv, DynamicConv2d):
                set_module(model, conv_name, fuse_conv_bn_eval(conv, bn))
            else:
                folder = _folder(conv)
                if folder is None:
                    raise ValueError(f"operator {operator_name(conv)} has no fold_output_affine method")
                folder(scale, shift)
        except ValueError as exc:
            report.skipped.append((label, str(exc)))
            continue
        set_module(model, bn_name, nn.Identity())
        report.folded.append(f"{label} ({operator_name(conv) if isinstance(conv, DynamicConv2d) else 'static'})")
    for module in list(model.modules()):
        inner = getattr(module, "fold_inner_batchnorm", None)
        if callable(inner) and isinstance(module, DynamicConv2d):
            try:
                report.inner += int(inner())
            except ValueError as exc:
                report.skipped.append((f"{type(module).__name__} inner BatchNorm", str(exc)))
    return report
