"""Exported models in ONNX Runtime: sessions set up for fair timing, an exported model against the static export of
the same architecture in one run (interleaved rounds, batch 1 and a batch you pass), and ONNX Runtime's profiler
summed per layer, so a ratio can be traced to the op of the graph that holds the time.

``python -m image_classification.tools.export CKPT --format onnx --benchmark`` prints these; docs/deployment.md
holds the figures measured with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np
import torch

from image_classification.timing import interleaved_samples

__all__ = [
    "DeployTiming",
    "LayerCost",
    "ConvShape",
    "NodeCost",
    "compare_models",
    "conv_costs",
    "format_layer_costs",
    "format_timings",
    "module_path",
    "onnxruntime_session",
    "layer_costs",
    "profile_nodes",
    "require_onnxruntime",
]

ModelSource = Union[str, Path, bytes]
#: what the graph names ONNX Runtime's layout conversions of its blocked (NCHWc) convolutions
REORDER_LAYER = "(layout reorders)"


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module; ValueError naming the install command when it is absent."""
    try:
        import onnxruntime
    except ImportError:
        raise ValueError("timing an ONNX model needs the optional package onnxruntime: pip install onnxruntime") \
            from None
    return onnxruntime


def onnxruntime_session(model: ModelSource, threads: int, profile: bool = False) -> Any:
    """A CPU ``InferenceSession`` with every graph optimisation, ``threads`` intra-op threads and no spinning.

    Spinning is off because sessions are timed in interleaved rounds: an idle session's intra-op threads
    otherwise spin for a while after each run and take the cores from the session being timed (static
    ResNet-18, batch 1, 2 threads on a 2-core CPU: 16.6 ms interleaved with spinning, 9.6 ms without). A
    server running one session may keep ONNX Runtime's default (spinning on) for a few percent of latency.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: no per-session warnings on the console
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="ort-profile-"), "profile")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _feed(session: Any, arrays: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The arrays a session takes, by its input names (an unused input is pruned from an exported graph)."""
    return {inp.name: arrays[inp.name] for inp in session.get_inputs()}


def _random_inputs(session: Any, batch: int, seed: int) -> Dict[str, np.ndarray]:
    """Uniform [0, 1) float32 arrays for every input of ``session`` with its batch axis set to ``batch``."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for inp in session.get_inputs():
        dims = [batch if i == 0 else int(d) for i, d in enumerate(inp.shape)]
        arrays[inp.name] = rng.random(dims, dtype=np.float32)
    return arrays


@dataclass
class DeployTiming:
    """Median milliseconds per run of each model at one batch size, and each model's ratio to the first."""

    batch: int
    ms: Dict[str, float]
    samples: int

    @property
    def ratios(self) -> Dict[str, float]:
        base = next(iter(self.ms.values()))
        return {name: value / base for name, value in self.ms.items()}


def compare_models(models: Mapping[str, ModelSource], batches: Sequence[int], threads: int, rounds: int = 15,
                   seed: int = 0) -> List[DeployTiming]:
    """Time every model of ``models`` (the first is the baseline of the ratios) in interleaved rounds.

    For each batch size: one session per model (the same sessions serve every batch: a dynamic batch axis), the
    same random input for all, two warm-up runs each, then ``rounds`` rounds that run every model once (every
    other round in reverse order, so none always follows the same other one); medians. Batches above 1 get
    fewer rounds (at least 5): their runs are longer and vary less.
    """
    if not models:
        raise ValueError("compare_models: no model to time")
    sessions = {name: onnxruntime_session(source, threads) for name, source in models.items()}
    first = next(iter(sessions.values()))
    out = []
    for batch in batches:
        arrays = _random_inputs(first, batch, seed)
        fns = {name: (lambda s=s, f=_feed(s, arrays): s.run(None, f)) for name, s in sessions.items()}
        repeats = rounds if batch == 1 else max(5, rounds // 2)
        samples = interleaved_samples(fns, torch.device("cpu"), repeats, warmup=2, alternate=True)
        out.append(DeployTiming(batch, {name: statistics.median(v) * 1e3 for name, v in samples.items()}, repeats))
    return out


def format_timings(timings: Sequence[DeployTiming], threads: int) -> List[str]:
    """A Markdown table: batch, each model's median ms, each model's ratio to the first."""
    names = list(timings[0].ms) if timings else []
    head = ["batch", *(f"{n} (ms)" for n in names), *(f"{n} / {names[0]}" for n in names[1:])]
    lines = [f"onnxruntime, CPU, {threads} intra-op thread(s), graph optimisation: all, no spinning, "
             f"median of interleaved rounds:", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for t in timings:
        ratios = t.ratios
        cells = [str(t.batch), *(f"{t.ms[n]:.2f}" for n in names), *(f"{ratios[n]:.2f}x" for n in names[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


@dataclass
class LayerCost:
    """ONNX Runtime's kernel time of the nodes exported from one layer (module path), per op type."""

    layer: str
    ms: float = 0.0
    ops: Dict[str, float] = field(default_factory=dict)


def module_path(node_name: str) -> str:
    """The module path a node was exported from: ``/layer1/layer1.0/conv1/Conv_3_output_0_nchwc`` ->
    ``layer1.0.conv1`` (the TorchScript-based exporter names nodes by module scope, a Sequential's children as
    ``<its scope>.<index>``; ONNX Runtime keeps the prefix when it rewrites a node). Names without a scope
    (the dynamo exporter's, ONNX Runtime's layout reorders) give ``(graph)`` / :data:`REORDER_LAYER`."""
    if node_name.startswith("Reorder"):
        return REORDER_LAYER
    parts = [p for p in node_name.split("/") if p][:-1]
    if not parts:
        return "(graph)"
    path, previous = parts[0], parts[0]
    for part in parts[1:]:
        # a Sequential's child is scoped "<sequential's scope>.<index>": append the index only
        path += part[len(previous):] if part.startswith(previous + ".") else f".{part}"
        previous = part
    return path


def _layer_of(node_name: str, layers: Sequence[str]) -> str:
    path = module_path(node_name)
    best = ""
    for layer in layers:
        if (path == layer or path.startswith(layer + ".")) and len(layer) > len(best):
            best = layer
    return best or path


@dataclass
class NodeCost:
    """One node of ONNX Runtime's optimised graph: its name, op type, median kernel ms, and its input and output
    shapes (``[batch, ...]`` lists, as the profiler records them)."""

    name: str
    op: str
    ms: float
    inputs: Tuple[Tuple[int, ...], ...]
    outputs: Tuple[Tuple[int, ...], ...]


def _shapes(entries: Sequence[Mapping[str, Sequence[int]]]) -> Tuple[Tuple[int, ...], ...]:
    return tuple(tuple(int(d) for d in next(iter(entry.values()))) for entry in entries)


def profile_nodes(model: ModelSource, batch: int, threads: int, runs: int = 10, seed: int = 0) -> List[NodeCost]:
    """ONNX Runtime's profiler over ``runs`` runs at ``batch`` (after two warm-ups): every node's median kernel time."""
    session = onnxruntime_session(model, threads, profile=True)
    feed = _random_inputs(session, batch, seed)
    for _ in range(2 + runs):
        session.run(None, feed)
    trace = Path(session.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        trace.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            trace.parent.rmdir()
    durations: Dict[str, List[float]] = defaultdict(list)
    meta: Dict[str, Tuple[str, Tuple[Tuple[int, ...], ...], Tuple[Tuple[int, ...], ...]]] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            node = name[: -len("_kernel_time")]
            args = event.get("args", {})
            durations[node].append(event["dur"] / 1e3)
            meta[node] = (args.get("op_name", "?"), _shapes(args.get("input_type_shape", [])),
                          _shapes(args.get("output_type_shape", [])))
    # the first runs are warm-ups: keep the last `runs` samples of every node
    return [NodeCost(node, meta[node][0], statistics.median(values[-runs:]), meta[node][1], meta[node][2])
            for node, values in durations.items()]


def layer_costs(nodes: Sequence[NodeCost], layers: Sequence[str] = ()) -> List[LayerCost]:
    """``nodes`` summed per layer and per op type within it, costliest layer first. A node belongs to the longest of
    ``layers`` (module names) its module path starts with (a PEDConv layer's generator nodes count to the layer),
    else to its own module path (:func:`module_path`)."""
    costs: Dict[str, LayerCost] = {}
    for node in nodes:
        layer = _layer_of(node.name, layers)
        cost = costs.setdefault(layer, LayerCost(layer))
        cost.ms += node.ms
        cost.ops[node.op] = cost.ops.get(node.op, 0.0) + node.ms
    return sorted(costs.values(), key=lambda c: -c.ms)


ConvShape = Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]


def conv_costs(nodes: Sequence[NodeCost], convs: Mapping[str, ConvShape]) -> List[LayerCost]:
    """Each conv of ``convs`` (name -> (input shape without batch, weight shape, output shape without batch)) with the
    time of the Conv node of those shapes. ONNX Runtime fuses a static conv with its ReLU or residual Add and names
    the fused node after the last op (``layer1.0.relu``), so node names cannot tell which conv it is; the shapes
    can (convs of one shape share one median, a fused ReLU or Add included)."""
    by_shape: Dict[ConvShape, List[float]] = defaultdict(list)
    for node in nodes:
        if node.op == "Conv" and len(node.inputs) >= 2 and node.outputs:
            by_shape[(node.inputs[0][1:], node.inputs[1], node.outputs[0][1:])].append(node.ms)
    out = []
    for name, shape in convs.items():
        if shape in by_shape:
            ms = statistics.median(by_shape[shape])
            out.append(LayerCost(name, ms, {"Conv": ms}))
    return sorted(out, key=lambda c: -c.ms)


def format_layer_costs(costs: Mapping[str, Sequence[LayerCost]], top: int = 12) -> List[str]:
    """Per layer (the ``top`` costliest of the first model), each model's kernel ms and the op that holds most of it."""
    names = list(costs)
    by_name = {name: {c.layer: c for c in values} for name, values in costs.items()}
    first = costs[names[0]]
    totals = {name: sum(c.ms for c in values) for name, values in costs.items()}
    lines = ["onnxruntime profiler, kernel time per layer (ms; the op holding most of it); totals: "
             + ", ".join(f"{n} {totals[n]:.2f} ms" for n in names),
             "| layer | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for cost in first[:top]:
        cells = []
        for name in names:
            c = by_name[name].get(cost.layer)
            if c is None:
                cells.append("-")
                continue
            op, op_ms = max(c.ops.items(), key=lambda kv: kv[1])
            cells.append(f"{c.ms:.3f} ({op} {op_ms:.3f})")
        lines.append(f"| {cost.layer} | " + " | ".join(cells) + " |")
    return lines
