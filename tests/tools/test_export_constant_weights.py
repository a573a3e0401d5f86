"""PEDConv exported with constant convolution weights (issue: PEDConv ships at static cost): every export form, chosen
by rule, by timing or by name, equals eager PyTorch at batch 1, 3 and 8 with both ONNX exporters, for every PEDConv
option set the recipes use; every Conv of the exported graph takes a constant weight and every op is one TensorRT's
ONNX parser supports; the deploy benchmark prints the ratio to the static export."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from small_nets import SmallConvNet

from image_classification.compat import dynamo_onnx_exporter_is_default
from image_classification.deployment.bn_folding import fold_batchnorm
from image_classification.deployment.inference import strip_training_parts
from image_classification.measurement.pedconv_export import choose_export_forms
from image_classification.models import build_model, convert_model
from image_classification.tools.export import (
    ExportError,
    computed_conv_weights,
    export_model,
    main,
    onnx_op_types,
    verify_export,
)

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
pytestmark = pytest.mark.skipif(not HAS_ORT, reason="onnx/onnxruntime not installed (pip install onnx onnxruntime)")
TOL = 1e-4
#: ONNX ops the PEDConv exports may use: each is in TensorRT 10's ONNX parser support matrix (onnx-tensorrt,
#: docs/operators.md). A new op in an export fails this test until it is checked against that matrix.
TENSORRT_OPS = {
    "Add", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "Equal", "Expand", "Flatten", "Gather", "Gemm",
    "GlobalAveragePool", "Identity", "MatMul", "MaxPool", "Mul", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Shape",
    "Sigmoid", "Slice", "Split", "Squeeze", "Sqrt", "Sign", "Abs", "Div", "Tile", "Transpose", "Unsqueeze", "Where",
    "Pad", "Sub", "LpNormalization", "ReduceL2", "Max", "Cast",
}
#: the PEDConv option sets of configs/ (Table 5 ablations, Appendix D); reparam=additive is refused
RECIPE_SPECS = [
    "pedconv", "pedconv:sampling=none", "pedconv:infomax=false", "pedconv:components=psi",
    "pedconv:components=phi", "pedconv:components=gamma", "pedconv:reduction=4", "pedconv:rank=4",
    "pedconv:rank=8", "pedconv:context=bilinear",
]


def _small(spec: str = "pedconv") -> nn.Module:
    torch.manual_seed(0)
    model = convert_model(SmallConvNet(), spec, "all")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "generator" in name:  # move the generators off their near-constant init: factors vary per sample
                param.normal_(0.0, 0.3)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_var.uniform_(0.5, 2.0)
                nn.init.normal_(m.bias, 0.0, 0.2)
    model.eval()
    strip_training_parts(model)
    return model


def _export_and_check(model: nn.Module, path: Path, exporter: str, forms: str, size: int = 12) -> list:
    folded = _small_copy(model)
    fold_batchnorm(folded)
    try:
        plan, _ = export_model(folded, path, "onnx", image_size=size, in_chans=3, exporter=exporter,
                               pedconv_forms=forms)
    except ExportError:
        if exporter == "dynamo" and not dynamo_onnx_exporter_is_default():
            pytest.skip("torch's dynamo ONNX exporter is not yet its default here (torch 2.6)")
        raise
    errors = verify_export(model, path, "onnx", size, 3, batches=(1, 3, 8))
    assert max(errors.values()) < TOL, errors
    assert computed_conv_weights(path) == []
    assert set(onnx_op_types(path)) <= TENSORRT_OPS, set(onnx_op_types(path)) - TENSORRT_OPS
    return plan.layers


def _small_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("forms", ["rule", "cols", "expand", "shift", "factored"])
def test_every_form_equals_eager_with_constant_conv_weights(forms: str, exporter: str, tmp_path: Path) -> None:
    """SmallConvNet with PEDConv on every conv but the stem: stride 2, a residual 1x1, depthwise, widening 1x1."""
    layers = _export_and_check(_small(), tmp_path / "m.onnx", exporter, forms)
    chosen = {name: path for name, _, path in layers}
    assert set(chosen) == {"conv1", "conv2", "conv3", "conv4"}  # placement "all" keeps the stem static
    if forms in ("cols", "factored"):  # applies everywhere
        assert set(chosen.values()) == {forms}
    elif forms != "rule":  # k x k layers take the form; the 1x1 ones fall back to their first applicable form
        assert chosen["conv1"] == chosen["conv3"] == forms and chosen["conv2"] == "cols"


@pytest.mark.parametrize("spec", RECIPE_SPECS)
def test_recipe_option_sets_export_exactly(spec: str, tmp_path: Path) -> None:
    _export_and_check(_small(spec), tmp_path / "m.onnx", "torchscript", "expand")


def test_shared_generators_and_a_real_network(tmp_path: Path) -> None:
    """ResNet-18 with the measured rule (its four forms all appear) and CIFAR ResNet-20 with one generator per block
    (placement '+share', Appendix D): exact, constant conv weights only."""
    torch.manual_seed(0)
    r18 = build_model("resnet18", "pedconv", num_classes=10).eval()
    strip_training_parts(r18)
    layers = _export_and_check(r18, tmp_path / "r18.onnx", "torchscript", "rule", size=128)
    assert {path for _, _, path in layers} == {"cols", "expand", "shift"}
    shared = build_model("cifar_resnet20", "pedconv", placement="paper+share", num_classes=10).eval()
    strip_training_parts(shared)
    _export_and_check(shared, tmp_path / "share.onnx", "torchscript", "rule", size=16)


def test_tune_times_each_layer_shape_once(tmp_path: Path, capsys) -> None:
    model = _small()
    choices = choose_export_forms(model, torch.randn(2, 3, 12, 12), "tune", threads=1, batch=3)
    by_name = {c.layer: c for c in choices}
    assert by_name["conv1"].how == "timed" and set(by_name["conv1"].ms) == {"cols", "expand", "shift", "factored"}
    assert by_name["conv2"].how == "timed" and set(by_name["conv2"].ms) == {"cols", "factored"}
    assert all(min(t) > 0 for c in choices for t in c.ms.values())
    assert "timing PEDConv export forms in onnxruntime" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown PEDConv export form choice 'fast'"):
        choose_export_forms(model, torch.randn(1, 3, 12, 12), "fast")


def _checkpoint(tmp_path: Path, conv: str) -> Path:
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", conv, num_classes=10)
    path = tmp_path / f"{conv}.pth.tar"
    torch.save({"arch": "cifar_resnet20", "conv": conv, "placement": "paper", "num_classes": 10, "in_chans": 3,
                "image_size": 16, "state_dict": model.state_dict(), "args": {"dataset": "cifar10"}}, path)
    return path


def test_cli_benchmark_prints_the_ratio_to_the_static_export(tmp_path: Path, capsys) -> None:
    ckpt = _checkpoint(tmp_path, "pedconv")
    args = [str(ckpt), "--format", "onnx", "--exporter", "torchscript", "--output", str(tmp_path / "m.onnx"),
            "--benchmark", "--benchmark-batch", "3", "--profile", "--threads", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "every Conv takes a constant weight" in out
    assert "| batch | static (ms) | pedconv (ms) | pedconv / static |" in out
    rows = [line for line in out.splitlines() if line.startswith("[export] | 1 |") or line.startswith("[export] | 3 |")]
    assert len(rows) == 2 and all(row.rstrip(" |").endswith("x") for row in rows)
    assert "onnxruntime profiler, kernel time per layer" in out and "| layer1.0.conv1 |" in out


def test_cli_benchmark_errors_are_one_line(tmp_path: Path, capsys) -> None:
    ckpt = _checkpoint(tmp_path, "pedconv")
    for extra, message in [(["--format", "torchscript", "--benchmark"], "use them with --format onnx"),
                           (["--format", "onnx", "--profile"], "--profile is part of the benchmark"),
                           (["--format", "onnx", "--threads", "0"], "--threads: must be a positive integer"),
                           (["--format", "onnx", "--pedconv-forms", "fast"], "invalid choice: 'fast'")]:
        with pytest.raises(SystemExit) as info:
            main([str(ckpt), *extra])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err, (extra, err)
