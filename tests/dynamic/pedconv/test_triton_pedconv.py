"""Fused Triton PEDConv kernels (PEDConv, BMVC 2021, Eq. 2): forward and every gradient against a plain
float64 reference of the equation, per-sample ``conv(x_b, W * (gamma_b o phi_b o psi_b))``.

Without CUDA the kernels run in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, set by
tests/conftest.py before triton is imported); with CUDA they run compiled on the GPU. The interpreter's cost is per
Triton operation, so the shapes are tiny (a few tiles each).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton", reason="triton is not installed")

from image_classification.dynamic.pedconv import triton as triton_pedconv  # noqa: E402
from image_classification.dynamic.pedconv.triton import (  # noqa: E402
    is_available,
    pedconv_conv2d_triton,
    unavailable_reason,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NAMES = ("x", "weight", "gamma", "phi", "psi")


@pytest.fixture(scope="module", autouse=True)
def triton_mode():
    """Without CUDA: Triton's interpreter, switched on by tests/conftest.py before triton is imported."""
    reason = unavailable_reason(DEVICE)
    if reason is not None:
        pytest.skip(reason)
    yield


def reference(x: torch.Tensor, weight: torch.Tensor, gamma: Optional[torch.Tensor], phi: Optional[torch.Tensor],
              psi: Optional[torch.Tensor], stride, padding, dilation) -> torch.Tensor:
    """The equation itself: one F.conv2d per sample with its effective weight W * (gamma o phi o psi)."""
    out_c, in_c, kh, kw = weight.shape
    outs = []
    for b in range(x.shape[0]):
        w = weight
        if gamma is not None:
            w = w * gamma[b].view(out_c, 1, 1, 1)
        if phi is not None:
            w = w * phi[b].view(1, in_c, 1, 1)
        if psi is not None:
            w = w * psi[b].reshape(1, 1, kh, kw)
        outs.append(F.conv2d(x[b : b + 1], w, None, stride, padding, dilation))
    return torch.cat(outs)


def make_inputs(batch: int, in_c: int, out_c: int, size: Tuple[int, int], kernel: Tuple[int, int],
                components: Sequence[str] = ("gamma", "phi", "psi"), seed: int = 0) -> List[Optional[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_c, *size, generator=gen, dtype=torch.float64)
    fan_in = in_c * kernel[0] * kernel[1]
    weight = torch.randn(out_c, in_c, *kernel, generator=gen, dtype=torch.float64) / fan_in ** 0.5
    # factors in (0.2, 1.2): post-sigmoid-like, but not all equal, so every factor really matters
    gamma = 0.2 + torch.rand(batch, out_c, generator=gen, dtype=torch.float64)
    phi = 0.2 + torch.rand(batch, in_c, generator=gen, dtype=torch.float64)
    psi = 0.2 + torch.rand(batch, kernel[0] * kernel[1], generator=gen, dtype=torch.float64)
    return [x, weight, gamma if "gamma" in components else None, phi if "phi" in components else None,
            psi if "psi" in components else None]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.isfinite(got).all()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def fp32_tol() -> float:
    # interpreter: exact float32 dots; GPU: cuDNN's TF32 setting applies to the kernel's float32 dots too
    return 1e-5 if not CUDA else 5e-3


def check_against_reference(inputs: List[Optional[torch.Tensor]], stride, padding, dilation, dtype: torch.dtype,
                            channels_last: bool, tol: float, psi_shape: Optional[Tuple[int, ...]] = None,
                            **kwargs) -> Dict[str, float]:
    """Forward and the gradient of every present input vs the float64 reference; returns the errors."""
    ref_leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    want = reference(*ref_leaves, stride, padding, dilation)
    grad_out = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    present = [t for t in ref_leaves if t is not None]
    want_grads = torch.autograd.grad(want, present, grad_out)

    leaves = []
    for i, t in enumerate(inputs):
        if t is None:
            leaves.append(None)
            continue
        t = t.to(device=DEVICE, dtype=dtype if i < 2 else torch.float32)
        if i == 0 and channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        leaves.append(t.requires_grad_())
    args = list(leaves)
    if psi_shape is not None and args[4] is not None:
        args[4] = args[4].view(psi_shape)
    got = pedconv_conv2d_triton(*args, stride, padding, dilation, autotune=False, **kwargs)
    assert got.dtype == dtype and got.shape == want.shape
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)
    grad = grad_out.to(device=DEVICE, dtype=dtype)
    if channels_last:
        grad = grad.contiguous(memory_format=torch.channels_last)
    got_grads = torch.autograd.grad(got, [t for t in leaves if t is not None], grad)

    errors = {"forward": rel_err(got, want)}
    names = [n for n, t in zip(NAMES, inputs) if t is not None]
    for name, leaf, g, w in zip(names, [t for t in leaves if t is not None], got_grads, want_grads):
        assert g.shape == leaf.shape and g.dtype == leaf.dtype, name
        errors["grad_" + name] = rel_err(g, w)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"
    return errors


# batch, C_in, C_out, (H, W), kernel, stride, padding, dilation, channels_last
CASES = {
    # 2 channel blocks on both GEMM sides (C 40, C_out 36 with 32-wide tiles), odd 5 x 7 map
    "3x3_multi_tile": (3, 40, 36, (5, 7), (3, 3), 1, 1, 1, False),
    "3x3_stride2_batch1_nhwc": (1, 12, 10, (7, 6), (3, 3), 2, 1, 1, True),
    "3x3_dilation2_pad0": (3, 8, 12, (9, 7), (3, 3), 1, 0, 2, False),
    "3x3_stride2_dilation2_nhwc": (3, 8, 6, (9, 8), (3, 3), 2, 2, 2, True),
    "1x1_stride2": (3, 24, 20, (5, 5), (1, 1), 2, 0, 1, False),
    "3x1_rect_stride_1x2": (2, 6, 5, (6, 5), (3, 1), (1, 2), (1, 0), 1, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_reference(case: str) -> None:
    batch, cin, cout, size, kernel, stride, padding, dilation, nhwc = CASES[case]
    inputs = make_inputs(batch, cin, cout, size, kernel)
    psi_shape = (batch, *kernel) if case == "3x3_stride2_batch1_nhwc" else None  # B x kh x kw accepted too
    check_against_reference(inputs, stride, padding, dilation, torch.float32, nhwc, fp32_tol(), psi_shape=psi_shape)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 2.5e-2)])
def test_half_precision_matches_reference(dtype: torch.dtype, tol: float) -> None:
    inputs = make_inputs(3, 16, 16, (5, 7), (3, 3), seed=3)
    check_against_reference(inputs, 1, 1, 1, dtype, True, tol)


def test_bfloat16_as_the_first_launch_of_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bfloat16 call before any kernel is loaded (a fresh process: no kernel cache) gets the interpreter's bf16
    dot treatment too; the launch options were read before the first launch loaded the kernels, so such a
    first call computed garbage (relative error 3e11) and passed only after another dtype had run."""
    monkeypatch.setattr(triton_pedconv, "_KERNELS", {})
    check_against_reference(make_inputs(3, 16, 16, (5, 7), (3, 3), seed=3), 1, 1, 1, torch.bfloat16, True, 2.5e-2)


@pytest.mark.parametrize("components", [("phi",), ("gamma", "psi")])
def test_left_out_components_are_ones(components: Tuple[str, ...]) -> None:
    inputs = make_inputs(2, 10, 12, (5, 6), (3, 3), components=components, seed=4)
    check_against_reference(inputs, 1, 1, 1, torch.float32, False, fp32_tol())


def test_split_k_weight_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """grad-W_base with the batch split over several programs (atomic adds of the partial tiles)."""
    splits: List[int] = []
    original = triton_pedconv._split_k

    def spy(*args, **kwargs) -> int:
        splits.append(original(*args, **kwargs))
        return splits[-1]

    monkeypatch.setattr(triton_pedconv, "_split_k", spy)
    monkeypatch.setattr(triton_pedconv, "_sm_count", lambda device: 64)
    monkeypatch.setattr(triton_pedconv, "_SPLIT_K_MIN_BLOCKS", 1)
    inputs = make_inputs(3, 8, 8, (8, 8), (3, 3), seed=5)
    check_against_reference(inputs, 1, 1, 1, torch.float32, False, fp32_tol())
    assert splits and max(splits) >= 3


def test_autocast_casts_like_conv2d() -> None:
    """Under autocast, x and W_base are cast to the autocast dtype (as F.conv2d); W_base's grad stays fp32."""
    dtype = torch.float16 if CUDA else torch.bfloat16
    x, weight, gamma, phi, psi = (t.float().to(DEVICE) for t in make_inputs(2, 8, 8, (4, 5), (3, 3), seed=6))
    weight.requires_grad_()
    with torch.autocast(DEVICE, dtype=dtype):
        y = pedconv_conv2d_triton(x, weight, gamma, phi, psi, 1, 1, 1, autotune=False)
    assert y.dtype == dtype
    want = reference(*(t.double().cpu() for t in (x, weight, gamma, phi, psi)), 1, 1, 1)
    assert rel_err(y, want) < 2.5e-2
    y.float().sum().backward()
    assert weight.grad is not None and weight.grad.dtype == torch.float32


class _LargestAllocation(TorchDispatchMode):
    """Records the largest storage (bytes) behind any tensor an aten op returns; the kernels allocate
    their outputs and buffers through torch, so a per-sample weight would show up here."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_no_per_sample_weight_is_materialized() -> None:
    """Forward and backward allocate nothing of the size of B per-sample weights (or their gradients)."""
    batch, channels = 3, 32
    x, weight, gamma, phi, psi = (t.float().to(DEVICE).requires_grad_()
                                  for t in make_inputs(batch, channels, channels, (4, 4), (3, 3), seed=7))
    with _LargestAllocation() as mode:
        y = pedconv_conv2d_triton(x, weight, gamma, phi, psi, 1, 1, 1, autotune=False)
        y.sum().backward()
    per_sample_weights = batch * weight.numel() * weight.element_size()
    assert weight.numel() * weight.element_size() <= mode.largest < per_sample_weights
    assert all(t.grad is not None for t in (x, weight, gamma, phi, psi))


def test_only_requested_gradients_are_computed() -> None:
    x, weight, gamma, phi, psi = (t.float().to(DEVICE) for t in make_inputs(2, 8, 6, (4, 4), (3, 3), seed=8))
    psi.requires_grad_()
    y = pedconv_conv2d_triton(x, weight, gamma, phi, psi, 1, 1, 1, autotune=False)
    (grad_psi,) = torch.autograd.grad(y.sum(), [psi])
    leaves = [t.double().cpu().requires_grad_(i == 4) for i, t in enumerate((x, weight, gamma, phi, psi))]
    (want,) = torch.autograd.grad(reference(*leaves, 1, 1, 1).sum(), [leaves[4]])
    assert rel_err(grad_psi, want) < fp32_tol()
    assert x.grad is None and weight.grad is None


def test_deterministic_mode_refuses_the_backward() -> None:
    x, weight, gamma, phi, psi = (t.float().to(DEVICE).requires_grad_()
                                  for t in make_inputs(1, 4, 4, (2, 2), (1, 1), seed=9))
    y = pedconv_conv2d_triton(x, weight, gamma, phi, psi, autotune=False)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="not deterministic"):
            y.sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("change,message", [
    (dict(weight=torch.zeros(6, 2, 3, 3)), "only groups = 1"),
    (dict(gamma=torch.zeros(2, 5)), r"gamma must have shape \(2, 6\)"),
    (dict(psi=torch.zeros(2, 4)), r"psi must have shape \(2, 9\) or \(2, 3, 3\)"),
    (dict(x=torch.zeros(4, 5, 5)), "x must be a 4-D tensor"),
    (dict(weight=torch.zeros(6, 4, 3, 3, dtype=torch.float64)), "weight dtype torch.float64 differs"),
    (dict(stride=0), "stride must be >= 1"),
    (dict(padding=(1, 1, 1)), "padding must be an int or a pair"),
    (dict(x=torch.zeros(2, 4, 1, 1), padding=0), "empty input or output"),
    (dict(phi=torch.zeros(2, 4, dtype=torch.int32)), "phi must be float32/float16/bfloat16"),
])
def test_bad_input_gets_one_line_error(change: Dict[str, object], message: str) -> None:
    args = dict(x=torch.zeros(2, 4, 5, 5), weight=torch.zeros(6, 4, 3, 3), gamma=torch.zeros(2, 6),
                phi=torch.zeros(2, 4), psi=torch.zeros(2, 9), stride=1, padding=1, dilation=1)
    args.update(change)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=message) as info:
        pedconv_conv2d_triton(**args)
    assert "\n" not in str(info.value) and str(info.value).startswith("pedconv_conv2d_triton: ")


def test_availability_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_available(DEVICE) and unavailable_reason(DEVICE) is None
    monkeypatch.setattr(triton_pedconv, "triton_version", lambda: None)
    assert "triton is not installed" in unavailable_reason(DEVICE)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        pedconv_conv2d_triton(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 1, 1), None, None, None)
    monkeypatch.undo()
    monkeypatch.setattr(triton_pedconv, "interpreting", lambda: False)
    assert "TRITON_INTERPRET=1" in unavailable_reason("cpu")


@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_compile_fullgraph_traces_the_custom_operators(channels_last: bool) -> None:
    """Forward and backward are custom operators with fake implementations: ``fullgraph=True`` traces
    them (no graph break) and the compiled result equals eager, gradients of every input included."""
    torch._dynamo.reset()
    x, weight, gamma, phi, psi = (t.float().to(DEVICE) for t in make_inputs(2, 8, 8, (5, 4), (3, 3), seed=10))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    leaves = [t.requires_grad_() for t in (x, weight, gamma, phi, psi)]

    def layer(inp: torch.Tensor, w: torch.Tensor, g: torch.Tensor, p: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch.relu(2 * pedconv_conv2d_triton(inp, w, g, p, s, 2, 1, 1, autotune=False))

    want = layer(*leaves)
    want_grads = torch.autograd.grad(want.square().sum(), leaves)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=False)
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got.square().sum(), leaves)
    # the forward is deterministic; the backward's float32 atomics may add in another order on a GPU
    assert torch.equal(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
