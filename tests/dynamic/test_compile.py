"""torch.compile(fullgraph=True) of every operator and of every PEDConv path, train and eval, equal to eager.

Graph capture (Dynamo, AOTAutograd with the custom autograd Functions) runs with the ``aot_eager``
backend, which is what ``fullgraph=True`` checks; one inductor run (C++ code generation, slow on CPU) is
marked slow. The autotuner runs at trace time, as a constant: tuning other shapes later adds no guard.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from image_classification.dynamic import autotune, build_conv, list_operators
from image_classification.dynamic.pedconv import PATHS

SPECS = [op for op in list_operators()] + [f"pedconv:path={p}" for p in PATHS if p != "auto"] + [
    "pedconv:reparam=additive", "pedconv:rank=2", "pedconv:sampling=learned", "pedconv:components=phi+psi",
    "pedconv_spatial:rank=2",
]


def run_train(fn, module: nn.Module, x: torch.Tensor, seed: int):
    torch.manual_seed(seed)
    xg = x.detach().clone().requires_grad_(True)
    out = fn(xg)
    grads = torch.autograd.grad(out.square().sum(), [xg, *module.parameters()], allow_unused=True)
    return out, grads


@pytest.mark.parametrize("spec", SPECS)
def test_fullgraph_compile_train_and_eval_equal_eager(spec):
    if "path=triton" in spec:
        from image_classification.dynamic.pedconv.triton import unavailable_reason

        if unavailable_reason("cpu") is not None:
            pytest.skip(unavailable_reason("cpu"))
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = build_conv(spec, 16, 16, 3, padding=1, bias=False)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager", dynamic=False)
    x = torch.randn(2, 16, 6, 6)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-5)
    module.train()
    out, grads = run_train(compiled, module, x, seed=1)
    ref_out, ref_grads = run_train(module, module, x, seed=1)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        if want is None:
            continue
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got / scale, want / scale, rtol=1e-4, atol=1e-5)


def test_autotuner_runs_at_trace_time_as_a_constant():
    """The tuned choice is baked into the graph: later tuning of other keys causes no recompilation."""
    torch._dynamo.reset()
    autotune.CACHE.clear()
    autotune.set_autotune(True)
    try:
        from torch._dynamo.utils import counters

        counters.clear()
        torch.manual_seed(0)
        layer = build_conv("pedconv", 8, 8, 3, padding=1).eval()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=False)
        x = torch.randn(2, 8, 5, 5)
        with torch.no_grad():
            out = compiled(x)
            assert len(autotune.CACHE) == 1 and layer.logged_paths()[((2, 8, 5, 5), False)]["source"] == "tuned"
            layer(torch.randn(3, 8, 5, 5))  # eager: tunes (and caches) another key
            assert len(autotune.CACHE) == 2
            torch.testing.assert_close(compiled(x), out)
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        autotune.set_autotune(None)
        autotune.CACHE.clear()


def test_compiled_state_dict_names_are_plain():
    module = nn.Sequential(build_conv("pedconv", 4, 8, 3, padding=1), nn.BatchNorm2d(8))
    names = set(module.state_dict())
    module.compile(backend="aot_eager", dynamic=False)
    module(torch.randn(2, 4, 5, 5))
    assert set(module.state_dict()) == names


@pytest.mark.slow
def test_inductor_pedconv_train_and_eval_equal_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(build_conv("pedconv:sampling=none", 8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), build_conv("pedconv:sampling=none,path=patch_gemm", 8, 8, 3, padding=1))
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    x = torch.randn(2, 8, 6, 6)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    model.train()
    out, grads = run_train(compiled, model, x, seed=1)
    ref_out, ref_grads = run_train(model, model, x, seed=1)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, ref_grads):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
