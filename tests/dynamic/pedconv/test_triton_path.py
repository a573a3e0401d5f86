"""The ``triton`` path of PEDConv2d (the fused Triton kernel as one entry of the path registry).

Without CUDA the path is forced (``path=triton``) on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1``, set by tests/conftest.py), and compared with the ``reference`` path (the
per-sample formula, PEDConv, BMVC 2021, Eq. 2) in the forward and in every gradient: input, W_base,
bias and the generator's parameters. ``path=auto`` never offers it off CUDA. The CUDA-marked tests
run the real thing on a GPU (scripts/gpu_checks.sh).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import List, Optional

import pytest
import torch
import torch.nn as nn

pytest.importorskip("triton", reason="triton is not installed")

from image_classification.dynamic import autotune, build_conv  # noqa: E402
from image_classification.dynamic.pedconv import (  # noqa: E402
    PATHS,
    PEDConv2d,
    paths,  # noqa: E402
)
from image_classification.dynamic.pedconv import triton as triton_pedconv  # noqa: E402
from image_classification.dynamic.pedconv.paths import PATH_REGISTRY, candidate_paths  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture
def kernels_run() -> None:
    """Skip, printing why, where the kernels cannot run here (an interpreter that cannot run their loops: Triton
    3.2/3.6 with numpy 2.4; the path's own one-line refusal is tested below)."""
    reason = triton_pedconv.unavailable_reason(DEVICE)
    if reason is not None:
        pytest.skip(reason)


def randomize(module: nn.Module, std: float = 0.3) -> nn.Module:
    """Move the generator away from its near-constant init so that the factors vary per sample."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "generator" in name or "bias" in name:
                param.normal_(0.0, std)
    return module


def forward_and_grads(module: PEDConv2d, x: torch.Tensor, path: str) -> List[Optional[torch.Tensor]]:
    module.path = path
    xg = x.detach().clone().requires_grad_(True)
    out = module(xg)
    grads = torch.autograd.grad(out.square().sum(), [xg, *module.parameters()], allow_unused=True)
    return [out, *grads]


def assert_same(got: List[Optional[torch.Tensor]], want: List[Optional[torch.Tensor]], names: List[str],
                tol: float) -> None:
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None or not g.abs().any(), name
            continue
        scale = max(1.0, w.abs().max().item())
        torch.testing.assert_close(g.double() / scale, w.double() / scale, rtol=tol, atol=tol, msg=name)


def test_triton_is_a_registered_lean_path() -> None:
    assert "triton" in PATHS and PATH_REGISTRY["triton"].lean and PATH_REGISTRY["triton"].tune


# in, out, kernel, stride, padding, dilation, rank, components, (H, W), batch, channels_last
CASES = {
    "odd_3x3_batch3": (6, 10, 3, 1, 1, 1, 1, ("gamma", "phi", "psi"), (7, 5), 3, False),
    "stride2_batch1_nhwc": (5, 7, 3, 2, 1, 1, 1, ("gamma", "phi", "psi"), (9, 6), 1, True),
    "dilation2_batch3_nhwc": (4, 6, 3, 1, 2, 2, 1, ("gamma", "phi", "psi"), (7, 7), 3, True),
    "rect_kernel_stride_1x2": (4, 5, (3, 1), (1, 2), (1, 0), 1, 1, ("gamma", "phi", "psi"), (5, 6), 2, False),
    "psi_only_rank2": (4, 6, 3, 2, 1, 1, 2, ("psi",), (6, 5), 3, False),
    "rank2_two_launches": (4, 4, 3, 1, 1, 1, 2, ("gamma", "phi", "psi"), (4, 5), 2, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forced_path_matches_reference_forward_and_every_gradient(case: str, kernels_run: None) -> None:
    cin, cout, k, s, p, d, rank, components, size, batch, nhwc = CASES[case]
    torch.manual_seed(0)
    module = randomize(PEDConv2d(cin, cout, k, s, p, d, 1, bias=True, rank=rank, components=components,
                                 sampling="none")).to(DEVICE).train()
    x = torch.randn(batch, cin, *size, device=DEVICE)
    if nhwc:
        x = x.contiguous(memory_format=torch.channels_last)
    names = ["forward", "grad_x", *("grad_" + n for n, _ in module.named_parameters())]
    want = forward_and_grads(module, x, "reference")
    got = forward_and_grads(module, x, "triton")
    assert module.logged_paths()[(tuple(x.shape), True)]["path"] == "triton"
    if nhwc:
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    # interpreter: exact float32 dots; GPU: TF32 per cuDNN's setting
    assert_same(got, want, names, 1e-5 if not CUDA else 5e-3)


def test_forced_path_in_inference_and_under_autocast(kernels_run: None) -> None:
    torch.manual_seed(1)
    module = randomize(PEDConv2d(6, 8, 3, padding=1, sampling="none")).to(DEVICE).eval()
    x = torch.randn(2, 6, 5, 5, device=DEVICE)
    with torch.no_grad():
        want = module(x)
        module.path = "triton"
        torch.testing.assert_close(module(x), want, rtol=1e-5 if not CUDA else 5e-3, atol=1e-5 if not CUDA else 5e-3)
        dtype = torch.float16 if CUDA else torch.bfloat16
        with torch.autocast(DEVICE, dtype=dtype):
            low = module(x)
            module.path = "fold"
            low_fold = module(x)
    assert low.dtype == low_fold.dtype  # the conv computes in the autocast dtype, as F.conv2d does
    torch.testing.assert_close(low.float(), want, rtol=3e-2, atol=3e-2)


def test_auto_never_offers_it_off_cuda() -> None:
    layer = PEDConv2d(8, 8, 3, padding=1)
    for grad in (False, True):
        assert not paths.triton_applicable(layer, (2, 8, 6, 6), grad)
        assert "triton" not in candidate_paths(layer, (2, 8, 6, 6), grad)


def _fake_cuda_layer(**changes) -> SimpleNamespace:
    weight = SimpleNamespace(is_cuda=True, dtype=torch.float32, device=torch.device("cuda"))
    attrs = dict(weight=weight, rank=1, components=("gamma", "phi", "psi"), reparam="multiplicative", groups=1)
    attrs.update(changes)
    return SimpleNamespace(**attrs)


def test_applicability_rules_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rules ``auto`` applies on a CUDA device, checked without one (a stand-in layer)."""
    monkeypatch.setattr(triton_pedconv, "interpreting", lambda: False)
    monkeypatch.setattr(triton_pedconv, "unavailable_reason", lambda device=None: None)
    shape = (4, 8, 7, 7)
    assert paths.triton_applicable(_fake_cuda_layer(), shape, True)
    assert paths.triton_applicable(_fake_cuda_layer(rank=3, components=("psi",)), shape, True)
    assert not paths.triton_applicable(_fake_cuda_layer(rank=2), shape, True)
    assert not paths.triton_applicable(_fake_cuda_layer(groups=2), shape, True)
    assert not paths.triton_applicable(_fake_cuda_layer(reparam="additive"), shape, False)
    double = SimpleNamespace(is_cuda=True, dtype=torch.float64, device=torch.device("cuda"))
    assert not paths.triton_applicable(_fake_cuda_layer(weight=double), shape, False)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not paths.triton_applicable(_fake_cuda_layer(), shape, True)
        assert paths.triton_applicable(_fake_cuda_layer(), shape, False)  # the forward has no atomics
    finally:
        torch.use_deterministic_algorithms(previous)
    monkeypatch.setattr(triton_pedconv, "unavailable_reason", lambda device=None: "CUDA is not available")
    assert not paths.triton_applicable(_fake_cuda_layer(), shape, True)


@pytest.mark.parametrize("kwargs,message", [
    (dict(groups=2), "groups = 1 only"),
    (dict(reparam="additive"), "multiplicative form only"),
])
def test_forced_path_where_it_does_not_apply_is_a_one_line_error(kwargs, message) -> None:
    layer = PEDConv2d(4, 4, 3, padding=1, path="triton", **kwargs).to(DEVICE)
    with pytest.raises(ValueError, match=message) as info:
        layer(torch.randn(2, 4, 5, 5, device=DEVICE))
    assert "\n" not in str(info.value) and str(info.value).startswith("pedconv: path=triton cannot run this layer: ")


def test_forced_path_refuses_float64_and_deterministic_training(kernels_run: None) -> None:
    layer = PEDConv2d(4, 4, 3, padding=1, path="triton").to(DEVICE)
    with pytest.raises(ValueError, match="float32/float16/bfloat16 only"):
        layer.double()(torch.randn(2, 4, 5, 5, dtype=torch.float64, device=DEVICE))
    layer.float()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(ValueError, match="use_deterministic_algorithms"):
            layer(torch.randn(2, 4, 5, 5, device=DEVICE))
        with torch.no_grad():
            layer.eval()(torch.randn(2, 4, 5, 5, device=DEVICE))  # inference is deterministic
    finally:
        torch.use_deterministic_algorithms(previous)


def test_forced_path_on_cpu_without_the_interpreter_names_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_pedconv, "interpreting", lambda: False)
    layer = PEDConv2d(4, 4, 3, padding=1, path="triton")
    with pytest.raises(ValueError, match="device 'cpu' needs TRITON_INTERPRET=1.*compiled kernels need CUDA"):
        layer(torch.randn(2, 4, 5, 5))


@pytest.mark.skipif(CUDA, reason="the interpreter's probe: the CPU runs (compiled kernels do not use it)")
def test_an_interpreter_that_cannot_run_the_loops_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter is probed once per process with a loop whose bound is a runtime value, as the kernels loop.
    Triton 3.2's interpreter (torch 2.6's) fails that on numpy 2.4: the path then says so, naming the remedy."""
    if triton_pedconv.unavailable_reason("cpu") is not None:
        pytest.skip(f"the real probe already fails here: {triton_pedconv.unavailable_reason('cpu')}")
    kernels = triton_pedconv._kernels()

    class _Failing:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch

    monkeypatch.setattr(kernels, "loop_bound_probe_kernel", _Failing())
    monkeypatch.delitem(triton_pedconv._KERNELS, "interpreter_reason")
    reason = triton_pedconv.unavailable_reason("cpu")
    assert reason is not None and "interpreter cannot run the kernels' loops with numpy" in reason
    assert "pip install 'numpy<2'" in reason and "only 0-dimensional arrays" in reason
    layer = build_conv("pedconv:path=triton", 4, 4, 3, padding=1)
    with pytest.raises(ValueError, match=r"^pedconv: path=triton cannot run this layer: Triton .* numpy") as info:
        layer(torch.randn(2, 4, 5, 5))
    assert "\n" not in str(info.value)
    monkeypatch.delitem(triton_pedconv._KERNELS, "interpreter_reason")  # probed afresh by the next test


def test_spec_string_selects_it() -> None:
    layer = build_conv("pedconv:path=triton", 4, 6, 3, padding=1)
    assert isinstance(layer, PEDConv2d) and layer.path == "triton"


# ------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
def test_cuda_auto_times_the_triton_path() -> None:
    autotune.CACHE.clear()
    autotune.set_autotune(True)
    try:
        torch.manual_seed(2)
        layer = randomize(PEDConv2d(32, 32, 3, padding=1)).cuda().train()
        x = torch.randn(8, 32, 14, 14, device="cuda", requires_grad=True)
        assert "triton" in candidate_paths(layer, tuple(x.shape), True)
        layer(x).sum().backward()
        entry = layer.logged_paths()[(tuple(x.shape), True)]
        assert entry["source"] == "tuned" and "triton" in entry["times_ms"]
    finally:
        autotune.set_autotune(None)
        autotune.CACHE.clear()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_inductor_compile_with_autocast_and_channels_last(dtype: torch.dtype) -> None:
    """The custom operators under inductor, AMP and channels_last: equal to the eager triton path."""
    torch._dynamo.reset()
    torch.manual_seed(3)
    net = nn.Sequential(randomize(PEDConv2d(16, 32, 3, padding=1, path="triton", sampling="none")), nn.ReLU(),
                        randomize(PEDConv2d(32, 16, 3, stride=2, padding=1, path="triton", sampling="none")))
    net = net.cuda().to(memory_format=torch.channels_last).train()
    x = torch.randn(4, 16, 15, 15, device="cuda").contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(net, fullgraph=True)

    def step(fn):
        with torch.autocast("cuda", dtype=dtype):
            out = fn(x)
        grads = torch.autograd.grad(out.float().square().sum(), list(net.parameters()), allow_unused=True)
        return out, grads

    want, want_grads = step(net)
    got, got_grads = step(compiled)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    for g, w in zip(got_grads, want_grads):
        if w is not None:
            scale = max(1.0, w.abs().max().item())
            torch.testing.assert_close(g / scale, w / scale, rtol=3e-2, atol=3e-2)


def test_tile_mode_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(triton_pedconv.TILES_ENV, raising=False)
    assert triton_pedconv.tile_mode() == "full"
    assert len(triton_pedconv._gemm_configs()) == len(triton_pedconv.AUTOTUNE_TILES)
    monkeypatch.setenv(triton_pedconv.TILES_ENV, "Small")
    assert triton_pedconv.tile_mode() == "small" and len(triton_pedconv._gemm_configs()) == 3
    monkeypatch.setenv(triton_pedconv.TILES_ENV, "fast")
    with pytest.raises(ValueError, match="PEDCONV_TRITON_TILES='fast': expected one of full, small, heuristic"):
        triton_pedconv.tile_mode()


def test_heuristic_tile_mode_turns_kernel_autotuning_off(monkeypatch: pytest.MonkeyPatch, kernels_run: None) -> None:
    seen: List[bool] = []
    original = triton_pedconv.pedconv_conv2d_triton

    def spy(*args, **kwargs):
        seen.append(kwargs["autotune"])
        return original(*args, **kwargs)

    monkeypatch.setattr(triton_pedconv, "pedconv_conv2d_triton", spy)
    layer = PEDConv2d(4, 4, 3, padding=1, path="triton").to(DEVICE).eval()
    x = torch.randn(1, 4, 5, 5, device=DEVICE)
    with torch.no_grad():
        monkeypatch.setenv(triton_pedconv.TILES_ENV, "heuristic")
        layer(x)
        monkeypatch.setenv(triton_pedconv.TILES_ENV, "full")
        layer(x)
    assert seen == [False, True]
