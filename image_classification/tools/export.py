"""Export a trained model to ONNX or TorchScript with a dynamic batch axis.

Usage::

    python -m image_classification.tools.export CHECKPOINT --format onnx|torchscript [--output PATH]
        [--opset N] [--image-size S] [--no-fold-bn] [--ema] [--exporter auto|dynamo|torchscript]
        [--batch-size N] [--no-verify] [--arch A --conv SPEC --placement P --num-classes N --in-chans C --dataset D]

The model is rebuilt from the checkpoint (:func:`image_classification.deployment.inference.load_inference_model`),
put in eval mode without its training-only parts (PEDConv's info-max decoders; sampling noise and
dropout are off in eval), BatchNorm is folded into the convs before it (:mod:`.bn_folding`; keep it
with ``--no-fold-bn``), and every dynamic layer is switched to an execution path whose ops keep the
batch a plain leading axis (:func:`prepare_for_export`). The artifact is then loaded back (onnxruntime
for ONNX, ``torch.jit.load`` for TorchScript) and its outputs are compared with the eager model's at
batch 1 and batch 5; a mismatch is an error (exit 1). onnx/onnxruntime (and onnxscript for the
``dynamo`` exporter) are optional packages: ``pip install onnx onnxruntime onnxscript``.

Why paths matter: per-sample weights are usually applied as one grouped convolution with
``groups = batch * groups``; ONNX ``Conv.group`` is a constant, so such a graph has a fixed batch.
The paths used instead, per operator (the ONNX ops are those the TorchScript-based exporter emits;
:func:`onnx_op_types` lists them for a file):

=============== ====================== ===================================================================
operator        export path            ops (besides the static layers' Conv/Gemm/Relu/Add/Pool/Flatten)
=============== ====================== ===================================================================
static          nn.Conv2d              Conv
pedconv         an export form per     generator: ReduceMean, Gemm, Relu, Sigmoid; every Conv with a constant
                layer (``rule``:       weight: the 0/1 tap selector (im2col), ``W_base`` as ONE 1x1 Conv
                ``cols``, ``expand``,  (``expand``/``shift``) or a MatMul with the per-sample scaled ``W_base``
                ``shift``,             (``cols``); gamma/phi/psi: Mul (:mod:`image_classification.dynamic.
                ``factored``)          pedconv.export_forms`). ``reparam=additive`` is refused (its low-rank
                                       term is a grouped conv with groups = batch).
pedconv_spatial as trained (unfold)    1x1 Conv generator, Sigmoid, Im2Col-style Unfold (Pad, Gather...),
                                       Mul, MatMul
dcd             ``branch``             Conv (W0), Mul/Add (Lambda, bias), MatMul (Phi Q^T, P); depthwise
                                       layers: per-sample weight + Unfold + MatMul (``unfold`` adapter)
dyconv,         ``unfold`` adapter     attention Gemm/Softmax or Sigmoid, MatMul aggregating the K
condconv                               kernels per sample, Unfold, batched MatMul
involution      as trained (unfold)    Conv (kernel generator), BatchNormalization, Unfold, Mul, ReduceSum
odconv          ``factored`` (n = 1),  attention Gemm, Sigmoid/Softmax; Mul (a_c, a_f); k=1: Pad, Slice,
                ``unfold`` (n > 1)     1x1 Conv per tap, Mul (a_s); k>1: MatMul (mixture), Unfold, MatMul
=============== ====================== ===================================================================

Every operator decides its own export path: its ``export_route()`` hook
(:class:`~image_classification.dynamic.protocol.ExportRoute`: a path to set, an adapter to wrap it in such
as :class:`PerSampleUnfoldConv2d`, or a reason to refuse). ``--exporter``: ``dynamo`` is
``torch.onnx.export(dynamo=True)`` with a dynamic batch dimension (needs onnxscript),
``torchscript`` the TorchScript-based exporter with ``dynamic_axes``; ``auto`` takes ``dynamo`` where torch
itself defaults to it (torch 2.11 and the pinned torch do; on torch 2.6, which does not, it cannot convert
CondConv, DCD or Involution) and the
TorchScript-based one otherwise. A failed export names the other exporter.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, cast

import torch
import torch.nn as nn

from image_classification.argparsing import ArgumentParser, positive_float, positive_int, run_program
from image_classification.atomic_files import replaced_atomically
from image_classification.compat import dynamo_onnx_exporter_is_default
from image_classification.deployment.bn_folding import FoldReport, fold_batchnorm
from image_classification.dynamic import autotune
from image_classification.dynamic.base import DynamicConv2d
from image_classification.dynamic.protocol import PerSampleUnfoldConv2d
from image_classification.dynamic.registry import operator_name
from image_classification.measurement.onnx_runtime import ConvShape
from image_classification.measurement.pedconv_export import FORM_CHOICES, choose_export_forms

__all__ = [
    "FORMATS",
    "ExportError",
    "ExportPlan",
    "PerSampleUnfoldConv2d",
    "computed_conv_weights",
    "export_model",
    "main",
    "onnx_op_types",
    "prepare_for_export",
    "verify_export",
]

FORMATS = ("onnx", "torchscript")
EXPORTERS = ("auto", "dynamo", "torchscript")
VERIFY_BATCHES = (1, 5)
INPUT_NAME, OUTPUT_NAME = "input", "logits"


class ExportError(ValueError):
    """The model cannot be exported as asked; the message is one line naming the reason."""


class _Mismatch(ExportError):
    """The written file does not compute what the model computes (exit status 1, not 2: not bad input)."""


def _one_line(text: object, limit: int = 300) -> str:
    flat = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(text)).split())  # without the exporters' terminal colours
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------
# Export paths
# ------------------------------------------------------------------------------------------------
class _HasPath(Protocol):
    """An operator with several execution paths (its ``path`` option), one of which an export route names."""

    path: str


@dataclass
class ExportPlan:
    """Per dynamic layer: its name, operator and the path the export uses."""

    layers: List[Tuple[str, str, str]] = field(default_factory=list)

    def summary(self) -> str:
        counts: Dict[str, int] = {}
        for _, op, path in self.layers:
            counts[f"{op} -> {path}"] = counts.get(f"{op} -> {path}", 0) + 1
        return ", ".join(f"{k} x{v}" for k, v in counts.items()) or "no dynamic layers"


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def prepare_for_export(model: nn.Module) -> Tuple[nn.Module, ExportPlan]:
    """A copy of ``model`` (eval mode) whose dynamic layers run dynamic-batch export paths, and the plan.

    Raises :class:`ExportError` naming the first layer that cannot be exported (and how many cannot).
    The original model is not modified.
    """
    export_model_ = copy.deepcopy(model).eval()
    plan = ExportPlan()
    refused: List[str] = []
    for name, module in list(export_model_.named_modules()):
        if not isinstance(module, DynamicConv2d):
            continue
        op = operator_name(module)
        route = module.export_route()
        if route.refuse:
            refused.append(f"layer {name} ({op}): {route.refuse}")
            continue
        if route.path is not None:
            cast(_HasPath, module).path = route.path
        if route.adapter is not None:
            _set_module(export_model_, name, route.adapter(module))
        plan.layers.append((name, op, route.label))
    if refused:
        more = f" (and {len(refused) - 1} more layer(s))" if len(refused) > 1 else ""
        raise ExportError(f"cannot export with a dynamic batch axis: {refused[0]}{more}")
    return export_model_, plan


# ------------------------------------------------------------------------------------------------
# Writing and checking artifacts
# ------------------------------------------------------------------------------------------------
def _require(module: str, purpose: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise ExportError(f"{purpose} needs the optional package {module}: pip install {module}") from None


def _dynamo_available() -> bool:
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        return False
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_exporter(exporter: str) -> str:
    """``auto`` -> ``dynamo`` where torch.onnx.export defaults to it (:func:`~image_classification.compat.
    dynamo_onnx_exporter_is_default`) and onnxscript is installed, else ``torchscript``."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; valid: {', '.join(EXPORTERS)}")
    if exporter == "auto":
        return "dynamo" if _dynamo_available() and dynamo_onnx_exporter_is_default() else "torchscript"
    if exporter == "dynamo" and not _dynamo_available():
        raise ExportError("the dynamo ONNX exporter needs onnxscript (pip install onnxscript); "
                          "or use the other one: --exporter torchscript")
    return exporter


def _other_exporter_hint(fmt: str, used: str) -> str:
    """``; or try --exporter X`` naming the other ONNX exporter where it can run, else ''."""
    if fmt != "onnx":
        return ""
    if used == "dynamo":
        return "; or try the other exporter: --exporter torchscript"
    if used == "torchscript" and _dynamo_available():
        return "; or try the other exporter: --exporter dynamo"
    return ""


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """A temporary file next to ``path``, renamed over it only when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as tmp:
        yield tmp


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' warnings, progress prints and log records (deprecations, tracer notes, and the
    tracebacks torch's loggers write to the terminal when a conversion fails, which the one-line error replaces)."""
    torch_logger = logging.getLogger("torch")
    level = torch_logger.level
    with warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
            contextlib.redirect_stderr(devnull):
        warnings.simplefilter("ignore")
        torch_logger.setLevel(logging.CRITICAL + 1)
        try:
            yield
        finally:
            torch_logger.setLevel(level)


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: Optional[int], exporter: str,
                 dynamic: bool = True) -> None:
    _require("onnx", "ONNX export")
    kwargs: Dict[str, Any] = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    if opset is not None:
        kwargs["opset_version"] = opset
    if exporter == "dynamo":
        # optimize=False: onnxscript's graph optimizer (its pattern rewriter, run by default) scales badly with the
        # per-tap ops of the dynamic layers: 215 s of a 277 s export of a PEDConv ResNet-20 on 2 CPU cores,
        # which looked like a hang; _fold_constants does the part that matters in 2 s
        kwargs.update(dynamo=True, external_data=False, optimize=False)
        if dynamic:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=1 << 16)},)
    else:
        if "dynamo" in inspect.signature(torch.onnx.export).parameters:
            kwargs["dynamo"] = False
        if dynamic:
            kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    accepted = inspect.signature(torch.onnx.export).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}  # e.g. external_data is newer than dynamo
    if opset is not None:
        import onnx

        newest = onnx.defs.onnx_opset_version()
        if opset > newest:
            raise ExportError(f"--opset {opset}: the installed onnx knows opsets up to {newest}")
    with _quiet():
        if exporter != "dynamo":
            torch.onnx.export(model, (example,), str(path), **kwargs)
        else:
            kwargs.pop("external_data", None)
            program = torch.onnx.export(model, (example,), None, **kwargs)
            assert program is not None  # the dynamo exporter returns the program it made
            _fold_constants(program.model)
            program.save(str(path), external_data=False)
    written = onnx_opset(path)
    if opset is not None and written != opset:  # an exporter that cannot target it writes its own instead
        other = "torchscript" if exporter == "dynamo" else "dynamo"
        raise ExportError(f"--opset {opset}: the {exporter} exporter wrote opset {written} instead (it cannot target "
                          f"opset {opset}); choose another --opset or try the other exporter: --exporter {other}")


def onnx_opset(path: str | Path) -> int:
    """The default-domain ONNX opset an exported file declares."""
    _require("onnx", "reading ONNX files")
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next(int(entry.version) for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))


def _fold_constants(model: Any) -> None:
    """The cheap part of onnxscript's optimizer: fold constant subgraphs (the shape arithmetic of the per-tap
    ops: 11k nodes -> 1.7k for a PEDConv ResNet-20, in 2 s), drop unused nodes, merge duplicates. Best effort:
    an onnxscript / onnx_ir without these passes leaves the (equivalent, larger) graph as exported."""
    try:
        import onnx_ir
        import onnx_ir.passes.common as passes
        import onnxscript.optimizer

        onnxscript.optimizer.fold_constants(model)
        onnx_ir.passes.Sequential(passes.RemoveUnusedNodesPass(), passes.CommonSubexpressionEliminationPass(),
                                  passes.RemoveUnusedNodesPass(),
                                  passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                                  passes.DeduplicateInitializersPass())(model)
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - older onnxscript / onnx_ir
        pass


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path))


def export_model(model: nn.Module, path: str | Path, fmt: str = "onnx", image_size: int = 224, in_chans: int = 3,
                 opset: Optional[int] = None, exporter: str = "auto",
                 fixed_batch: Optional[int] = None, pedconv_forms: str = "rule", threads: int = 2,
                 tune_batch: int = 8) -> Tuple[ExportPlan, str]:
    """Write ``model`` (eval mode, already folded as wanted) to ``path`` with a dynamic batch axis.

    PEDConv layers get their export form (constant convolution weights throughout) by ``pedconv_forms``
    (:func:`~image_classification.measurement.pedconv_export.choose_export_forms`: ``rule``, ``tune`` -- timed in
    ONNX Runtime with ``threads`` threads at batch 1 and ``tune_batch`` -- or one form's name).
    ``fixed_batch`` exports for that one batch size instead: at batch 1 the layers keep their own (``auto``)
    paths, so per-sample kernels become convolution weights computed in the graph (one dense conv per layer); a
    larger fixed batch takes the dynamic-batch paths and forms with a fixed axis. Returns the export plan and the
    exporter used (``torch.jit.trace`` for TorchScript). The file is written atomically: an existing file at
    ``path`` is replaced only by a finished export.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fixed_batch is not None and fixed_batch < 1:
        raise ExportError(f"fixed batch size must be >= 1, got {fixed_batch}")
    # a fixed batch above 1 gains nothing from the layers' own paths (they fold per-sample kernels only at batch 1),
    # and some of them trace to shape checks the TorchScript-based exporter rejects ('unexpected sym_eq'): it takes
    # the dynamic-batch paths, with a fixed axis
    own_paths = fixed_batch == 1
    if not own_paths:
        prepared, plan = prepare_for_export(model)
    else:
        prepared = copy.deepcopy(model).eval()
        plan = ExportPlan([(name, operator_name(m), f"{getattr(m, 'path', 'own')} at batch {fixed_batch}")
                           for name, m in prepared.named_modules() if isinstance(m, DynamicConv2d)])
    param = next(prepared.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    # dynamic batch: trace at batch 2, so no batch-1 special case is recorded
    batch = 2 if fixed_batch is None else fixed_batch
    example = torch.randn(batch, in_chans, image_size, image_size, device=device)
    if not own_paths:
        try:
            choices = choose_export_forms(prepared, example, pedconv_forms, threads, tune_batch)
        except ValueError as exc:
            raise ExportError(str(exc)) from None
        forms = {choice.layer: choice.form for choice in choices}
        plan.layers = [(name, op, forms.get(name, label)) for name, op, label in plan.layers]
    target = Path(path)
    used = "torch.jit.trace"
    try:
        with _atomic_target(target) as tmp:
            if fmt == "onnx":
                used = resolve_exporter(exporter)
                _export_onnx(prepared, example, tmp, opset, used, dynamic=fixed_batch is None)
            else:
                _export_torchscript(prepared, example, tmp)
    except ExportError:
        raise
    except Exception as exc:  # exporter failures of every kind: one line, never a deep traceback
        raise ExportError(f"{fmt} export failed ({type(exc).__name__}: {_one_line(exc, 200)})"
                          f"{_other_exporter_hint(fmt, used)}") from None
    return plan, used


def onnx_op_types(path: str | Path) -> List[str]:
    """The sorted ONNX op types of an exported file (the graph and its local functions)."""
    _require("onnx", "reading ONNX files")
    import onnx

    proto = onnx.load(str(path))
    ops = {node.op_type for node in proto.graph.node}
    for function in proto.functions:
        ops.update(node.op_type for node in function.node)
    return sorted(ops)


def computed_conv_weights(path: str | Path) -> List[str]:
    """The Conv nodes of an ONNX file whose weight is computed in the graph (neither an initializer nor a Constant
    node's output): what keeps a runtime from pre-packing it, and what TensorRT's parser takes only as a constant."""
    _require("onnx", "reading ONNX files")
    import onnx

    proto = onnx.load(str(path))
    constants = {init.name for init in proto.graph.initializer}
    constants.update(out for node in proto.graph.node if node.op_type == "Constant" for out in node.output)
    return [node.name or f"Conv #{i}" for i, node in enumerate(proto.graph.node)
            if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] not in constants]


def _run_artifact(path: Path, fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if fmt == "onnx":
        _require("onnxruntime", "checking the ONNX file")
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch >= 2.9 marks torch.jit deprecated
        loaded = torch.jit.load(str(path), map_location="cpu")
    return lambda x: loaded(x)


@torch.no_grad()
def verify_export(model: nn.Module, path: str | Path, fmt: str, image_size: int, in_chans: int,
                  batches: Sequence[int] = VERIFY_BATCHES, seed: int = 0) -> Dict[int, float]:
    """Largest |artifact - eager ``model``| relative to the eager output's range, per batch size (on CPU)."""
    try:
        runner = _run_artifact(Path(path), fmt)
    except ExportError:
        raise
    except Exception as exc:  # the runtime refuses the file: one line
        raise ExportError(f"cannot load {path} to check it ({type(exc).__name__}: {_one_line(exc, 200)})") from None
    eager = copy.deepcopy(model).cpu().eval()
    gen = torch.Generator().manual_seed(seed)
    errors: Dict[int, float] = {}
    for batch in batches:
        x = torch.randn(batch, in_chans, image_size, image_size, generator=gen)
        # every eager path is exact, so the reference needs no path timing (tuning a PEDConv ResNet-18 from an
        # empty path cache took most of a minute of a 76 s export)
        with autotune.disabled():
            expected = eager(x)
        try:
            got = runner(x)
        except Exception as exc:
            raise ExportError(f"{path} fails at batch {batch} ({type(exc).__name__}: {_one_line(exc, 200)})") from None
        if tuple(got.shape) != tuple(expected.shape):
            raise ExportError(f"exported model returns shape {tuple(got.shape)} at batch {batch}, "
                              f"eager {tuple(expected.shape)}")
        scale = float(expected.abs().max()) or 1.0
        errors[batch] = float((got.float() - expected).abs().max()) / scale
    return errors


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    from image_classification.deployment.inference import add_model_arguments

    p = ArgumentParser(prog="python -m image_classification.tools.export",
                                description="Export a checkpoint to ONNX or TorchScript with a dynamic batch axis.")
    p.add_argument("checkpoint", help="checkpoint file (model_best.pth.tar, checkpoint.pth.tar, a state dict)")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx or torchscript")
    p.add_argument("--output", "-o", help="output file (default: the checkpoint's name with .onnx / .pt)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file (default: refuse it; the file is replaced only by a checked "
                        "export)")
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default: the exporter's own)")
    p.add_argument("--image-size", type=positive_int, default=None, help="input size (default: the checkpoint's)")
    p.add_argument("--no-fold-bn", dest="fold_bn", action="store_false",
                   help="keep BatchNorm layers (default: fold them into the convs before them)")
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights")
    p.add_argument("--exporter", default="auto", choices=EXPORTERS, help="ONNX exporter (default: auto)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reloading the file and comparing it with PyTorch at batch 1 and 5")
    p.add_argument("--batch-size", "-b", type=positive_int, default=None,
                   help="export for this fixed batch size instead of a dynamic batch axis (batch-1 deployment: "
                        "per-sample kernels become conv weights computed in the graph; faster, see README)")
    p.add_argument("--tolerance", type=positive_float, default=1e-4,
                   help="largest accepted |exported - eager| relative to the output range (default 1e-4)")
    p.add_argument("--pedconv-forms", default="rule", choices=FORM_CHOICES,
                   help="how PEDConv layers get their export form (all with constant conv weights; "
                        "docs/deployment.md): rule = a measured shape rule, the same graph on every machine "
                        "(default); tune = time every form of every layer shape in onnxruntime on this machine; "
                        "or one form wherever it applies")
    p.add_argument("--threads", type=positive_int, default=2,
                   help="onnxruntime intra-op threads of --pedconv-forms tune, --benchmark and --profile (default 2)")
    p.add_argument("--benchmark", action="store_true",
                   help="after writing, time the export against the static export of the same architecture in "
                        "onnxruntime (interleaved rounds, batch 1 and --benchmark-batch) and print the ratios")
    p.add_argument("--benchmark-batch", type=positive_int, default=8,
                   help="the larger batch of --benchmark/--profile and of --pedconv-forms tune (default 8)")
    p.add_argument("--profile", action="store_true",
                   help="with --benchmark: onnxruntime's profiler per layer, exported and static, and the op "
                        "that holds each layer's time")
    add_model_arguments(p, image_size=False,
                        dataset_help="imagenet, fashion-mnist or cifar10 (sets the default image size)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from image_classification.data import DataError
    from image_classification.deployment.inference import load_inference_model
    from image_classification.training.checkpoint import CheckpointError, trust_checkpoints

    parser = _parser()
    args = parser.parse_args(argv)
    trust_checkpoints(args.trust_checkpoints)
    if (args.benchmark or args.profile or args.pedconv_forms == "tune") and args.format != "onnx":
        parser.error("--benchmark, --profile and --pedconv-forms tune time ONNX files in onnxruntime: "
                     "use them with --format onnx")
    if args.profile and not args.benchmark:
        parser.error("--profile is part of the benchmark: add --benchmark")
    if args.batch_size == 1 and args.pedconv_forms != "rule":
        parser.error("--pedconv-forms chooses the export forms; with --batch-size 1 the layers keep their own paths "
                     "(per-sample kernels folded into one conv): drop one of the two")
    if args.format == "torchscript" and args.opset is not None:
        parser.error("--opset applies to --format onnx only")
    start = time.perf_counter()
    try:
        output = Path(args.output) if args.output else _default_output(args.checkpoint, args.format)
        if output.exists() and not args.overwrite:
            raise ExportError(f"{output} exists; pass --overwrite to replace it (only by a checked export) or choose "
                              f"another --output")
        loaded = load_inference_model(
            args.checkpoint, arch=args.arch, conv=args.conv, placement=args.placement, num_classes=args.num_classes,
            in_chans=args.in_chans, image_size=args.image_size, dataset=args.dataset, ema=args.ema)
        model = copy.deepcopy(loaded.model) if args.fold_bn else loaded.model
        print(f"[export] {loaded.source}: arch {loaded.arch}, operator {loaded.conv}, placement {loaded.placement}, "
              f"{loaded.num_classes} classes, {loaded.in_chans} x {loaded.image_size} x {loaded.image_size} input")
        if args.fold_bn:
            report: FoldReport = fold_batchnorm(model)
            print(f"[export] BatchNorm: {report.summary()}")
        how = "the dynamo exporter" if args.format == "onnx" and resolve_exporter(args.exporter) == "dynamo" else \
            "the TorchScript-based exporter" if args.format == "onnx" else "torch.jit.trace"
        print(f"[export] exporting with {how} (tracing the model: seconds to a minute) ...", flush=True)
        with _atomic_target(output) as tmp:  # the file appears at --output only once it is checked
            plan, used = export_model(model, tmp, args.format, loaded.image_size, loaded.in_chans, args.opset,
                                      args.exporter, fixed_batch=args.batch_size, pedconv_forms=args.pedconv_forms,
                                      threads=args.threads, tune_batch=args.benchmark_batch)
            print(f"[export] paths: {plan.summary()}")
            if args.format == "onnx":
                with contextlib.suppress(ExportError):
                    print(f"[export] ONNX ops: {', '.join(onnx_op_types(tmp))}")
                    computed = computed_conv_weights(tmp)
                    print("[export] every Conv takes a constant weight (runtimes pre-pack it; TensorRT-ready)"
                          if not computed else f"[export] note: {len(computed)} Conv(s) take a weight computed in "
                          f"the graph (no pre-packing; TensorRT needs constant conv weights): "
                          f"{', '.join(computed[:3])}")
            if args.verify:
                batches = VERIFY_BATCHES if args.batch_size is None else (args.batch_size,)
                errors = verify_export(loaded.model, tmp, args.format, loaded.image_size, loaded.in_chans, batches)
                text = ", ".join(f"batch {b}: {e:.2e}" for b, e in errors.items())
                if not max(errors.values()) <= args.tolerance:
                    raise _Mismatch(f"the {args.format} export differs from PyTorch ({text}; tolerance "
                                    f"{args.tolerance:g}); nothing written to {output}")
                print(f"[export] outputs equal PyTorch's (max relative difference {text})")
        how = f"{used} exporter" if args.format == "onnx" else used
        axis = "dynamic batch axis" if args.batch_size is None else f"fixed batch {args.batch_size}"
        print(f"[export] wrote {output} ({how}, {output.stat().st_size / 2**20:.1f} MiB, {axis})")
        if args.benchmark:
            _benchmark(output, loaded, args, used)
    except _Mismatch as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except (ExportError, CheckpointError, DataError, ValueError, OSError) as exc:
        parser.exit(2, f"{parser.prog}: error: {_one_line(exc)}\n")
    print(f"[export] done in {time.perf_counter() - start:.1f} s")
    return 0


def _benchmark(exported: Path, loaded: Any, args: argparse.Namespace, exporter: str) -> None:
    """The deploy benchmark: ``exported`` against the static export of the same architecture, in onnxruntime."""
    import tempfile

    from image_classification.measurement.onnx_runtime import (
        compare_models,
        conv_costs,
        format_layer_costs,
        format_timings,
        layer_costs,
        profile_nodes,
    )
    from image_classification.models import build_model

    static = build_model(loaded.arch, "static", num_classes=loaded.num_classes, in_chans=loaded.in_chans).eval()
    if args.fold_bn:
        fold_batchnorm(static)
    if args.batch_size is not None:  # a fixed-batch file runs at that batch only
        batches: Tuple[int, ...] = (args.batch_size,)
    else:
        batches = (1, args.benchmark_batch) if args.benchmark_batch != 1 else (1,)
    with tempfile.TemporaryDirectory(prefix="pedconv-benchmark-") as tmp:
        static_path = Path(tmp) / "static.onnx"
        print(f"[export] benchmark: exporting the static {loaded.arch} the same way, then timing both in onnxruntime "
              f"at batch {' and '.join(map(str, batches))} ({args.threads} thread(s); about a minute) ...", flush=True)
        export_model(static, static_path, "onnx", loaded.image_size, loaded.in_chans, args.opset, exporter)
        models = {"static": static_path, str(loaded.conv): exported}
        for line in format_timings(compare_models(models, batches, args.threads), args.threads):
            print(f"[export] {line}")
        if args.profile:
            convs = _conv_shapes(static, loaded.in_chans, loaded.image_size)
            for batch in batches:
                dynamic_cost = layer_costs(profile_nodes(exported, batch, args.threads), list(convs))
                static_cost = conv_costs(profile_nodes(static_path, batch, args.threads), convs)
                print(f"[export] batch {batch}:")
                for line in format_layer_costs({str(loaded.conv): dynamic_cost, "static": static_cost}):
                    print(f"[export] {line}")


def _conv_shapes(model: nn.Module, in_chans: int, image_size: int) -> Dict[str, ConvShape]:
    """Each conv of ``model`` by name: (input shape, weight shape, output shape), batch axis dropped (one forward)."""
    shapes: Dict[str, ConvShape] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda m, args, out, name=name: shapes.__setitem__(
                name, (tuple(args[0].shape[1:]), tuple(m.weight.shape), tuple(out.shape[1:])))))
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _default_output(checkpoint: str, fmt: str) -> Path:
    path = Path(checkpoint)
    stem = path.name
    for suffix in (".pth.tar", ".pth", ".pt", ".tar", ".ckpt"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return path.with_name(stem + (".onnx" if fmt == "onnx" else ".torchscript.pt"))


if __name__ == "__main__":
    run_program(main)
