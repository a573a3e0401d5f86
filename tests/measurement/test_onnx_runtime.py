"""ONNX Runtime measurements (image_classification/measurement/onnx_runtime.py): module paths from node names,
interleaved timing with ratios to the first model, and the profiler's per-layer and per-shape sums."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from image_classification.measurement.onnx_runtime import (
    REORDER_LAYER,
    compare_models,
    conv_costs,
    format_layer_costs,
    format_timings,
    layer_costs,
    module_path,
    onnxruntime_session,
    profile_nodes,
)

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnx/onnxruntime not installed (pip install onnx onnxruntime)")


def test_module_path_of_exported_node_names() -> None:
    assert module_path("/layer1/layer1.0/conv1/Conv_3_output_0_nchwc") == "layer1.0.conv1"
    assert module_path("/features/features.3/conv/conv.1/conv.1.0/Mul_2") == "features.3.conv.1.0"
    assert module_path("/layer1/layer1.0/conv1/generator/fc_share/Gemm") == "layer1.0.conv1.generator.fc_share"
    assert module_path("ReorderInput_token_7") == REORDER_LAYER
    assert module_path("node_Conv_12") == "(graph)"


class _Block(nn.Module):
    def __init__(self, extra: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1) if extra else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.conv2(x) * x.mean((2, 3), keepdim=True) if self.conv2 is not None else x


def _onnx(model: nn.Module, path: Path) -> Path:
    import inspect

    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    torch.onnx.export(model.eval(), (torch.randn(2, 16, 12, 12),), str(path), input_names=["input"],
                      output_names=["y"], dynamic_axes={"input": {0: "b"}, "y": {0: "b"}}, **kwargs)
    return path


@needs_ort
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compare_and_profile(tmp_path: Path) -> None:
    torch.manual_seed(0)
    small, large = _onnx(_Block(False), tmp_path / "a.onnx"), _onnx(_Block(True), tmp_path / "b.onnx")
    timings = compare_models({"one": small, "two": large}, (1, 3), threads=1, rounds=5)
    assert [t.batch for t in timings] == [1, 3] and [t.samples for t in timings] == [5, 5]
    assert all(t.ratios["one"] == 1.0 and t.ratios["two"] > 0 for t in timings)
    table = format_timings(timings, 1)
    assert table[1] == "| batch | one (ms) | two (ms) | two / one |" and table[3].startswith("| 1 |")
    nodes = profile_nodes(large, 2, threads=1, runs=3)
    assert {n.op for n in nodes} >= {"Conv", "Mul"} and all(n.ms >= 0 for n in nodes)
    costs = {c.layer: c for c in layer_costs(nodes, ["conv1", "conv2"])}
    assert costs["conv1"].ops.get("Conv", 0) > 0 and costs["conv2"].ops.get("Conv", 0) > 0
    shape = ((16, 12, 12), (16, 16, 3, 3), (16, 12, 12))
    static = conv_costs(profile_nodes(small, 2, threads=1, runs=3), {"conv1": shape, "other": ((8,), (8,), (8,))})
    assert [c.layer for c in static] == ["conv1"]  # found by its shapes; an unknown shape is left out
    lines = format_layer_costs({"two": list(costs.values()), "one": static})
    assert lines[1] == "| layer | two | one |" and any(line.startswith("| conv2 |") and "| - |" in line
                                                          for line in lines)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        onnxruntime_session(small, 0)
