"""PEDConv's lean batch-1 inference (the folded-weight convolution and the batch-1 patch GEMM): exact against the
``reference`` path in float64 for every path it stands in for, every geometry and component set; the aten calls it
makes, counted; the scratch buffer and the inference caches never serve stale or shared tensors."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from image_classification.dynamic import autotune
from image_classification.dynamic.pedconv import PEDConv2d
from image_classification.models import build_model

GEOMETRIES = [
    # in, out, kernel, stride, padding, dilation, groups, input size
    (8, 12, 3, 1, 1, 1, 1, 7),
    (8, 12, 3, 2, 1, 2, 2, 9),
    (8, 8, 3, 1, 1, 1, 8, 6),  # depthwise
    (4, 8, 3, 2, 0, 1, 4, 7),  # depthwise with a channel multiplier
    (6, 9, 1, 1, 0, 1, 1, 5),  # pointwise: the GEMM takes the input as the patch matrix
    (6, 9, 1, 2, 0, 1, 3, 5),
    (4, 40, 3, 1, 1, 1, 1, 4),  # C_out > H_out W_out: the GEMM scales the patches, gamma the output
    (4, 40, 1, 1, 0, 1, 1, 4),  # ... pointwise
]
COMPONENT_SETS = [("gamma", "phi", "psi"), ("phi", "psi"), ("gamma",), ("psi",), ("gamma", "phi")]
BATCH1_PATHS = ["fold", "materialize", "sample_loop", "patch_gemm", "unfold"]


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _layer(row, components, path, bias=False, seed=0):
    cin, cout, k, stride, padding, dilation, groups, size = row
    torch.manual_seed(seed)
    layer = PEDConv2d(cin, cout, k, stride, padding, dilation, groups, bias=bias, components=components,
                      path=path).double().eval()
    with torch.no_grad():  # spread the factors over (0, 1): the default init puts them all near 0.5
        for param in layer.generator.parameters():
            param.normal_(0.0, 0.5)
        if bias:
            layer.bias.normal_()
    x = torch.randn(1, cin, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    return layer, x


def _reference(layer, x):
    path = layer.path
    layer.path = "reference"
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        layer.path = path


@pytest.mark.parametrize("row", GEOMETRIES)
@pytest.mark.parametrize("path", BATCH1_PATHS)
def test_lean_inference_equals_reference(row, path):
    """Every path the lean inference stands in for, under inference_mode and no_grad, equals the plain formula;
    the lean route is the one that ran (it returns a tensor) wherever it applies."""
    for i, components in enumerate(COMPONENT_SETS):
        layer, x = _layer(row, components, path, bias=i != 2, seed=i)
        expected = _reference(layer, x)
        for context in (torch.inference_mode, torch.no_grad):
            with context():
                out = layer(x)
                lean = layer._lean_inference(x)
            torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10, msg=f"{components} {context}")
            gemm_only = path in ("patch_gemm", "unfold")
            if not (gemm_only and row[6] > 1) and not (path == "unfold" and row[2] == 1):
                assert lean is not None, (path, components)
                torch.testing.assert_close(lean, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("row", [GEOMETRIES[0], GEOMETRIES[4], GEOMETRIES[6], GEOMETRIES[7]])
@pytest.mark.parametrize("path", ["fold", "patch_gemm"])
def test_lean_inference_channels_last_and_float32(row, path):
    """A channels_last model (weights too, as the profiler's --channels-last makes it) and input, float32."""
    for components in (COMPONENT_SETS[0], COMPONENT_SETS[1], COMPONENT_SETS[2]):
        layer, x = _layer(row, components, path)
        expected = _reference(layer, x)
        layer.float().to(memory_format=torch.channels_last)
        with torch.inference_mode():
            out = layer(x.float().contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_lean_inference_not_taken_where_it_does_not_apply():
    """Training mode, batch > 1, rank > 1, the additive form, bilinear context and autograd take the paths."""
    x = torch.randn(1, 8, 6, 6)
    cases = [PEDConv2d(8, 8, 3, padding=1, rank=2), PEDConv2d(8, 8, 3, padding=1, reparam="additive"),
             PEDConv2d(8, 8, 3, padding=1, context="bilinear")]
    with torch.no_grad():
        for layer in cases:
            assert layer.eval()._lean_inference(x) is None
        layer = PEDConv2d(8, 8, 3, padding=1)
        assert layer.train()._lean_inference(x) is None
        assert layer.eval()._lean_inference(torch.randn(2, 8, 6, 6)) is None
        assert layer._lean_inference(x) is not None


def test_outputs_are_not_scratch_and_survive_the_next_call():
    """The per-sample weight lives in a reused buffer; what a forward returns does not."""
    layer, x = _layer(GEOMETRIES[0], COMPONENT_SETS[0], "fold")
    with torch.inference_mode():
        first = layer(x)
        kept = first.clone()
        layer(torch.randn_like(x))
        other = PEDConv2d(8, 12, 3, padding=1, path="fold").double().eval()
        other(torch.randn_like(x))
    torch.testing.assert_close(first, kept, rtol=0, atol=0)


def test_inference_caches_follow_dtype_device_and_parameter_changes():
    """A forward after ``.double()``, ``load_state_dict`` or an in-place update uses the new parameters."""
    layer = PEDConv2d(8, 8, 3, padding=1).eval()
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        before = layer(x)
        layer.double()  # swaps .data: same parameter objects, same versions
        torch.testing.assert_close(layer(x.double()), before.double(), rtol=1e-6, atol=1e-6)
        layer.float()
        state = {k: v * 2 if "heads" in k else v for k, v in layer.state_dict().items()}
        layer.load_state_dict(state)
        changed = layer(x)
        reference = _reference(layer, x)
    torch.testing.assert_close(changed, reference, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(changed, before)


def _extra_calls(arch: str) -> float:
    """Aten calls of one batch-1 eval forward, PEDConv minus static, per dynamic layer (paths by the heuristic)."""
    counts = {}
    layers = 0
    for conv in ("static", "pedconv"):
        torch.manual_seed(0)
        model = build_model(arch, conv, "paper").eval()
        x = torch.randn(1, 3, 224, 224)
        with torch.inference_mode():
            model(x)
            with _Count() as count:
                model(x)
        counts[conv] = sum(count.calls.values())
        layers = max(layers, sum(isinstance(m, PEDConv2d) for m in model.modules()))
    return (counts["pedconv"] - counts["static"]) / layers


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_batch1_eval_extra_aten_calls_per_layer(arch, monkeypatch):
    """Batch-1 eval: at most 12 aten calls per PEDConv layer beyond the static model's (10 for a folded-weight
    conv; 12/14 where the batch-1 patch GEMM runs); the paths come from the heuristic, so the count is fixed."""
    monkeypatch.setattr(autotune, "autotune_enabled", lambda: False)
    assert _extra_calls(arch) <= 12


def test_lean_conv_layer_makes_ten_extra_calls():
    layer = PEDConv2d(64, 64, 3, padding=1, bias=False, path="fold").eval()
    x = torch.randn(1, 64, 14, 14)
    with torch.inference_mode():
        layer(x)
        with _Count() as count:
            layer(x)
    calls = dict(count.calls)
    assert calls.pop("convolution", 0) + calls.pop("conv2d", 0) == 1
    assert sum(calls.values()) == 10, calls


@pytest.mark.parametrize("path", ["fold", "materialize", "patch_gemm"])
def test_compiled_batch1_inference_equals_eager(path):
    """Compiled (fullgraph) batch-1 inference: the eager lean route is skipped under tracing, and a layer whose
    weight outgrows its patches runs the constant-weight GEMM; both equal eager."""
    torch._dynamo.reset()
    for cin, cout, size in ((8, 64, 6), (8, 8, 8)):  # C_out > H_out W_out, and not
        torch.manual_seed(0)
        layer = PEDConv2d(cin, cout, 3, padding=1, bias=True, path=path).eval()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=False)
        x = torch.randn(1, cin, size, size)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
