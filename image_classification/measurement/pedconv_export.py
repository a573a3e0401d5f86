"""Choosing PEDConv's export form layer by layer (:mod:`image_classification.dynamic.pedconv.export_forms`).

Every form computes Eq. 2 exactly with constant convolution weights; which is fastest depends on the layer's
channels and map size and on the runtime's CPU. ``rule`` applies :func:`~image_classification.dynamic.pedconv.
export_forms.form_rule` (measured on a 2-core x86 CPU; the same graph on every machine), ``tune`` times every
applicable form of every distinct layer shape in ONNX Runtime on this machine (the layer's convolution alone,
its factors as inputs, at batch 1 and a larger batch) and keeps the fastest, and a form's name uses that form
wherever it applies (1x1 kernels and layers without psi have one form).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from image_classification.dynamic.pedconv import EXPORT_FORMS, PEDConv2d, applicable_forms, form_rule
from image_classification.dynamic.pedconv.paths import PATH_REGISTRY, Factors
from image_classification.progress import progress

from .onnx_runtime import compare_models

__all__ = ["FORM_CHOICES", "FormChoice", "choose_export_forms", "record_input_shapes"]

#: ``--pedconv-forms`` values: the shape rule, timing in ONNX Runtime, or one form everywhere it applies
FORM_CHOICES: Tuple[str, ...] = ("rule", "tune", *EXPORT_FORMS)
_COMPONENT_ORDER = ("gamma", "phi", "psi")


@dataclass
class FormChoice:
    """The export form of one PEDConv layer, how it was chosen, and (``tune``) each candidate's median ms at
    batch 1 and at the larger batch."""

    layer: str
    form: str
    input_shape: Tuple[int, ...]
    how: str
    ms: Dict[str, Tuple[float, float]] = field(default_factory=dict)


def record_input_shapes(model: nn.Module, example: Tensor) -> Dict[str, Tuple[int, ...]]:
    """The input shape of every PEDConv layer of ``model`` in one forward of ``example`` (no gradients)."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, PEDConv2d):
            hooks.append(module.register_forward_pre_hook(
                lambda _m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape))))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


class _FormProbe(nn.Module):
    """One layer's convolution in one form, its factors as inputs (what the timing compares; the generator is
    the same in every form)."""

    def __init__(self, layer: PEDConv2d, form: str) -> None:
        super().__init__()
        # a fresh layer of the same geometry and options (the timing does not depend on the values; a copy of a
        # shared generator's leader would copy its followers too)
        self.layer = PEDConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                               padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=False,
                               rank=layer.rank, components=layer.components, infomax=False)
        self.layer.generator = None
        self.layer.set_export_form(form)
        self.form = form
        self.present = tuple(c for c in _COMPONENT_ORDER if c in layer.components)

    def forward(self, x: Tensor, *factors: Tensor) -> Tensor:
        given = dict(zip(self.present, factors))
        f = Factors(given.get("gamma"), given.get("phi"), given.get("psi"))
        return PATH_REGISTRY[self.form].run(self.layer, x, self.layer.weight, f)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
            contextlib.redirect_stderr(devnull):
        warnings.simplefilter("ignore")
        yield


def _probe_onnx(layer: PEDConv2d, form: str, input_shape: Tuple[int, ...]) -> bytes:
    """The ONNX bytes of ``layer``'s convolution in ``form`` (TorchScript-based exporter, dynamic batch)."""
    probe = _FormProbe(layer, form).eval()
    batch = 2
    dims = layer.component_dims()
    x = torch.randn(batch, *input_shape[1:])
    factors = tuple(torch.rand(batch, layer.rank, dims[c]) for c in probe.present)
    names = ["x", *probe.present]
    kwargs: Dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    with tempfile.TemporaryDirectory(prefix="pedconv-form-") as tmp, _quiet(), torch.no_grad():
        path = os.path.join(tmp, "probe.onnx")
        torch.onnx.export(probe, (x, *factors), path, input_names=names, output_names=["y"],
                          dynamic_axes={n: {0: "batch"} for n in [*names, "y"]}, **kwargs)
        with open(path, "rb") as f:
            return f.read()


def _signature(layer: PEDConv2d, shape: Tuple[int, ...]) -> Tuple[object, ...]:
    return (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
            layer.groups, layer.rank, layer.components, shape[1:])


def _time_forms(layer: PEDConv2d, shape: Tuple[int, ...], forms: Sequence[str], threads: int,
                batch: int) -> Dict[str, Tuple[float, float]]:
    models = {form: _probe_onnx(layer, form, shape) for form in forms}
    timings = compare_models(models, (1, batch), threads, rounds=7)
    return {form: (timings[0].ms[form], timings[1].ms[form]) for form in forms}


def choose_export_forms(model: nn.Module, example: Tensor, how: str = "rule", threads: int = 2,
                        batch: int = 8) -> List[FormChoice]:
    """Set every PEDConv layer of ``model`` (prepared for export, eval mode) to an export form, chosen by ``how``
    (:data:`FORM_CHOICES`) for the input size of ``example``; returns the choices in layer order.

    ``tune`` exports each distinct (layer geometry, options, input size) once per applicable form and times it
    in ONNX Runtime with ``threads`` threads at batch 1 and ``batch`` (interleaved rounds); the form with the
    smallest sum of its two times relative to the fastest at each batch wins.
    """
    if how not in FORM_CHOICES:
        raise ValueError(f"unknown PEDConv export form choice {how!r}; valid: {', '.join(FORM_CHOICES)}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, PEDConv2d)]
    if not layers:
        return []
    shapes = record_input_shapes(model, example[:1])
    timed: Dict[Tuple[object, ...], Dict[str, Tuple[float, float]]] = {}
    if how == "tune":
        todo: Dict[Tuple[object, ...], Tuple[PEDConv2d, Tuple[int, ...]]] = {}
        for name, layer in layers:
            if name in shapes and len(applicable_forms(layer)) > 1:
                todo.setdefault(_signature(layer, shapes[name]), (layer, shapes[name]))
        for key, (layer, shape) in progress(list(todo.items()), "timing PEDConv export forms in onnxruntime",
                                            unit="layer shape", every_s=5.0):
            timed[key] = _time_forms(layer, shape, applicable_forms(layer), threads, batch)
    choices = []
    for name, layer in layers:
        seen = shapes.get(name)
        if seen is None:  # not reached by the forward (an unused layer): any form computes it
            layer.set_export_form("factored")
            choices.append(FormChoice(name, "factored", (), "unused"))
            continue
        shape = seen
        forms = applicable_forms(layer)
        times = timed.get(_signature(layer, shape), {})
        if times:
            best1 = min(t[0] for t in times.values())
            best_n = min(t[1] for t in times.values())
            form = min(forms, key=lambda f: times[f][0] / best1 + times[f][1] / best_n)
            chosen_how = "timed"
        elif how in EXPORT_FORMS:
            form, chosen_how = (how if how in forms else forms[0]), "fixed"
        else:
            form, chosen_how = form_rule(layer, shape), "rule"
        layer.set_export_form(form)
        choices.append(FormChoice(name, form, shape, chosen_how, times))
    return choices
