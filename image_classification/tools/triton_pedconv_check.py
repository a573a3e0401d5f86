"""Device check of the fused Triton PEDConv kernels (:mod:`image_classification.dynamic.pedconv.triton`): exactness
on the GPU and per-layer timing against ``nn.Conv2d`` on cuDNN, in one call::

    python -m image_classification.tools.triton_pedconv_check --out DIR
        [--nets resnet18,resnet50] [--batch 64] [--dtype fp16|bf16|fp32] [--memory-format nhwc|nchw]
        [--tiles heuristic|small|full] [--fold] [--budget-s 420] [--smoke]
    python -m image_classification.tools.triton_pedconv_check --ptx-report --out DIR   # no GPU needed

Phases (results are rewritten after every layer, so a run cut short by a time limit still reports):

1. **exactness**: forward and the gradients of x, W_base, gamma, phi and psi of a few small cases
   (odd sizes, stride 2, dilation 2, NCHW and channels_last, fp32/fp16/bf16; heuristic tile) against
   a float64 reference of PEDConv Eq. 2 (``conv(x_b, W_base * (gamma_b o phi_b o psi_b))`` per
   sample) on the CPU.
2. **layers**: every PEDConv layer shape of the networks (``build_model(arch, conv='pedconv')``,
   ``paper`` placement, 224 px input, batch ``--batch``), each timed as: ``nn.Conv2d``/cuDNN forward
   and forward+backward (grad of x and W) vs the Triton path forward and forward+backward (grads of
   x, W_base, gamma, phi, psi), and with ``--fold`` the grouped-conv ``fold`` path in plain torch.
   CUDA events, warm-up (which includes the autotuning of a new shape), interleaved samples, medians.
   Each layer is also checked for exactness against a float32 torch composite on the GPU.
   A network line sums ``count x time`` over its layers (convolutions only).

Outputs in ``--out``: ``triton_pedconv_check.json`` (everything), ``triton_pedconv_check.md`` (the
tables) and ``raport.json`` (DLLogger JSON lines, one record per layer). ``--smoke`` runs the same
code on two tiny layers (CPU + ``TRITON_INTERPRET=1`` works) to test the script itself.

``--ptx-report`` compiles each kernel ahead of time for sm_90 (H100/H200) with Triton's own ptxas,
no GPU needed, and reports registers, spills, shared memory and whether Hopper's ``wgmma`` is used,
for every candidate tile (run it without ``TRITON_INTERPRET``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from image_classification.argparsing import ArgumentParser, positive_int, run_program
from image_classification.atomic_files import replaced_atomically, write_json_atomic
from image_classification.dynamic.pedconv import triton as triton_pedconv
from image_classification.dynamic.pedconv.triton import pedconv_conv2d_triton, unavailable_reason
from image_classification.timing import calls_for_duration, interleaved_samples, synchronize

__all__ = ["LayerSpec", "network_layers", "check_exactness", "time_layer", "ptx_report", "main"]

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SMALL_TILES = ((128, 64, 32, 3, 8), (64, 128, 32, 3, 8), (128, 128, 32, 3, 8))
HEURISTIC_TILE = ((128, 64, 32, 3, 8),)
_NET_SHORT = {"resnet18": "r18", "resnet50": "r50"}


@dataclass(frozen=True)
class LayerSpec:
    """One PEDConv layer geometry at its input resolution (``count`` = layers of that shape in the net)."""

    net: str
    in_channels: int
    out_channels: int
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    height: int
    width: int
    count: int = 1

    @property
    def name(self) -> str:
        k, s = self.kernel, self.stride
        return (f"{_NET_SHORT.get(self.net, self.net)} {self.in_channels}->{self.out_channels} {k[0]}x{k[1]} "
                f"s{s[0]} @{self.height}")


def network_layers(arch: str, image_size: int = 224) -> List[LayerSpec]:
    """The distinct PEDConv layer shapes of ``arch`` (paper placement), in network order, with counts."""
    from image_classification.dynamic.pedconv import PEDConv2d
    from image_classification.models import build_model

    model = build_model(arch, conv="pedconv").eval()
    seen: OrderedDict[tuple, int] = OrderedDict()
    skipped = []

    def hook(module: PEDConv2d, inputs: Tuple[Tensor, ...]) -> None:
        if module.groups != 1:
            skipped.append(module)
            return
        key = (module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
               module.dilation, int(inputs[0].shape[2]), int(inputs[0].shape[3]))
        seen[key] = seen.get(key, 0) + 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, PEDConv2d)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for handle in handles:
            handle.remove()
    if skipped:
        print(f"{arch}: {len(skipped)} grouped PEDConv layers skipped (the Triton path is groups = 1)")
    return [LayerSpec(arch, cin, cout, kernel, stride, padding, dilation, height, width, count=count)
            for (cin, cout, kernel, stride, padding, dilation, height, width), count in seen.items()]


def smoke_layers() -> List[LayerSpec]:
    return [LayerSpec("smoke", 8, 12, (3, 3), (1, 1), (1, 1), (1, 1), 5, 7, count=2),
            LayerSpec("smoke", 12, 8, (3, 3), (2, 2), (1, 1), (1, 1), 7, 6, count=1)]


# -------------------------------------------------------------------------------------------- reference
#: (x, weight, gamma, phi, psi) of one case, and (stride, padding, dilation)
Operands = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]
Geometry = Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]


def _operands(tensors: Sequence[Tensor]) -> Operands:
    """The five operands of a case, in order, as a tuple of five (so they unpack into the calls positionally)."""
    x, weight, gamma, phi, psi = tensors
    return x, weight, gamma, phi, psi


def reference(x: Tensor, weight: Tensor, gamma: Tensor, phi: Tensor, psi: Tensor,
              stride: Any, padding: Any, dilation: Any) -> Tensor:
    """PEDConv Eq. 2 literally: per sample, ``F.conv2d`` with ``W_base * (gamma_b o phi_b o psi_b)``."""
    out_c, in_c, kh, kw = weight.shape
    outs = []
    for b in range(x.shape[0]):
        w = weight * gamma[b].view(out_c, 1, 1, 1) * phi[b].view(1, in_c, 1, 1) * psi[b].view(1, 1, kh, kw)
        outs.append(F.conv2d(x[b : b + 1], w, None, stride, padding, dilation))
    return torch.cat(outs)


def fold_composite(x: Tensor, weight: Tensor, gamma: Tensor, phi: Tensor, psi: Tensor,
                   stride: Any, padding: Any, dilation: Any) -> Tensor:
    """``gamma * conv(phi * x, W * psi)`` with one grouped conv (PEDConv2d's ``fold`` path, in torch)."""
    batch, in_c, height, width = x.shape
    out_c, _, kh, kw = weight.shape
    u = x * phi.view(batch, in_c, 1, 1).to(x.dtype)
    w = weight.unsqueeze(0) * psi.view(batch, 1, 1, kh, kw).to(weight.dtype)
    y = F.conv2d(u.reshape(1, batch * in_c, height, width), w.reshape(batch * out_c, in_c, kh, kw), None,
                 stride, padding, dilation, groups=batch)
    y = y.view(batch, out_c, y.shape[-2], y.shape[-1])
    return y * gamma.view(batch, out_c, 1, 1).to(y.dtype)


def _rel(got: Tensor, want: Tensor) -> float:
    got, want = got.detach().double(), want.detach().double().to(got.device)
    if not torch.isfinite(got).all():
        return float("nan")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def _random_case(batch: int, in_c: int, out_c: int, size: Tuple[int, int], kernel: Tuple[int, int],
                 seed: int) -> List[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_c, *size, generator=gen, dtype=torch.float64)
    fan_in = in_c * kernel[0] * kernel[1]
    weight = torch.randn(out_c, in_c, *kernel, generator=gen, dtype=torch.float64) / fan_in ** 0.5
    gamma = 0.2 + torch.rand(batch, out_c, generator=gen, dtype=torch.float64)
    phi = 0.2 + torch.rand(batch, in_c, generator=gen, dtype=torch.float64)
    psi = 0.2 + torch.rand(batch, kernel[0] * kernel[1], generator=gen, dtype=torch.float64)
    return [x, weight, gamma, phi, psi]


# batch, C_in, C_out, (H, W), kernel, stride, padding, dilation, dtype, channels_last, tolerance
EXACTNESS_CASES = (
    ("fp16 nhwc 3x3 s1 odd", 3, 64, 64, (15, 13), (3, 3), 1, 1, 1, "fp16", True, 4e-3),
    ("fp16 nchw 3x3 s2 d2", 3, 24, 40, (17, 15), (3, 3), 2, 2, 2, "fp16", False, 4e-3),
    ("fp32 nchw 3x3 s1 d2 p0", 1, 40, 36, (11, 9), (3, 3), 1, 0, 2, "fp32", False, 5e-3),
    ("bf16 nhwc 1x1 s2", 2, 64, 72, (9, 7), (1, 1), 2, 0, 1, "bf16", True, 2.5e-2),
)


def check_exactness(device: torch.device, cases: Sequence[tuple] = EXACTNESS_CASES) -> List[Dict[str, Any]]:
    """Forward and all five gradients of each case vs the float64 CPU reference; one dict per case.

    Uses the heuristic tile (no autotuning: every dtype/geometry here is a fresh compilation); the
    tuned tiles are checked on every timed layer instead (:func:`time_layer`)."""
    rows: List[Dict[str, Any]] = []
    for name, batch, in_c, out_c, size, kernel, stride, padding, dilation, dtype_name, nhwc, tol in cases:
        dtype = _DTYPES[dtype_name]
        inputs = _random_case(batch, in_c, out_c, size, kernel, seed=len(rows))
        leaves = [t.clone().requires_grad_() for t in inputs]
        want = reference(*_operands(leaves), stride, padding, dilation)
        grad_out = torch.randn(want.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
        want_grads = torch.autograd.grad(want, leaves, grad_out)
        dev = []
        for i, t in enumerate(inputs):
            t = t.to(device=device, dtype=dtype if i < 2 else torch.float32)
            if i == 0 and nhwc:
                t = t.contiguous(memory_format=torch.channels_last)
            dev.append(t.requires_grad_())
        got = pedconv_conv2d_triton(*_operands(dev), stride, padding, dilation, autotune=False)
        gy = grad_out.to(device=device, dtype=dtype)
        if nhwc:
            gy = gy.contiguous(memory_format=torch.channels_last)
        got_grads = torch.autograd.grad(got, dev, gy)
        errors = {"forward": _rel(got, want)}
        for label, g, w in zip(("x", "weight", "gamma", "phi", "psi"), got_grads, want_grads):
            errors["grad_" + label] = _rel(g, w)
        worst = max(errors.values())
        rows.append(dict(case=name, dtype=dtype_name, channels_last=nhwc, tolerance=tol, errors=errors,
                         passed=bool(worst <= tol)))  # NaN compares False: a NaN fails
        verdict = "ok" if rows[-1]["passed"] else "FAIL"
        print(f"exactness {name:28s} worst rel err {worst:.2e} (tol {tol:.0e}) {verdict}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------- timing
def measure(fns: Dict[str, Callable[[], Any]], device: torch.device, warmup: int = 3, repeats: int = 7,
            target_ms: float = 10.0) -> Dict[str, float]:
    """Warm up each function (compilation and autotuning happen here), then interleaved samples of enough calls
    to last ``target_ms`` (:func:`image_classification.timing.interleaved_samples`); the median per function, in
    milliseconds."""
    interleaved_samples(fns, device, 0, warmup=warmup)
    synchronize(device)
    number = {name: calls_for_duration(fn, device, target_ms / 1e3, cap=50) for name, fn in fns.items()}
    samples = interleaved_samples(fns, device, repeats, number=number)
    return {name: 1e3 * statistics.median(values) for name, values in samples.items()}


@dataclass
class LayerResult:
    layer: Dict[str, Any]
    ms: Dict[str, float] = field(default_factory=dict)
    ratios: Dict[str, float] = field(default_factory=dict)
    errors: Dict[str, float] = field(default_factory=dict)
    configs: Dict[str, str] = field(default_factory=dict)
    note: str = ""


def time_layer(spec: LayerSpec, batch: int, dtype: torch.dtype, channels_last: bool, device: torch.device,
               autotune: bool, fold: bool, repeats: int = 7, warmup: int = 3) -> LayerResult:
    """Time one layer shape: cuDNN vs the Triton path (and the torch fold path); check it for exactness."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def rand(*shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)

    x = rand(batch, spec.in_channels, spec.height, spec.width).contiguous(memory_format=fmt)
    kh, kw = spec.kernel
    weight = rand(spec.out_channels, spec.in_channels, kh, kw, scale=(spec.in_channels * kh * kw) ** -0.5)
    weight = weight.contiguous(memory_format=fmt)
    gamma = torch.rand(batch, spec.out_channels, generator=gen).add(0.2).to(device=device, dtype=dtype)
    phi = torch.rand(batch, spec.in_channels, generator=gen).add(0.2).to(device=device, dtype=dtype)
    psi = torch.rand(batch, kh * kw, generator=gen).add(0.2).to(device=device, dtype=dtype)
    geometry = (spec.stride, spec.padding, spec.dilation)
    with torch.no_grad():
        y_shape = F.conv2d(x[:1], weight, None, *geometry).shape[1:]
    grad_out = rand(batch, *y_shape).contiguous(memory_format=fmt)
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, gamma, phi, psi)]

    def static_fwd() -> None:
        with torch.no_grad():
            F.conv2d(x, weight, None, *geometry)

    def static_train() -> None:
        y = F.conv2d(leaves[0], leaves[1], None, *geometry)
        torch.autograd.grad(y, leaves[:2], grad_out)

    def triton_fwd() -> None:
        with torch.no_grad():
            pedconv_conv2d_triton(x, weight, gamma, phi, psi, *geometry, autotune=autotune)

    def triton_train() -> None:
        y = pedconv_conv2d_triton(*_operands(leaves), *geometry, autotune=autotune)
        torch.autograd.grad(y, leaves, grad_out)

    fns: Dict[str, Callable[[], Any]] = {"static_fwd": static_fwd, "triton_fwd": triton_fwd,
                                          "static_train": static_train, "triton_train": triton_train}
    if fold:
        def fold_fwd() -> None:
            with torch.no_grad():
                fold_composite(x, weight, gamma, phi, psi, *geometry)

        def fold_train() -> None:
            y = fold_composite(*_operands(leaves), *geometry)
            torch.autograd.grad(y, leaves, grad_out)

        fns.update(fold_fwd=fold_fwd, fold_train=fold_train)

    result = LayerResult(layer=dict(asdict(spec), name=spec.name, batch=batch))
    result.errors = _layer_errors(leaves, grad_out, geometry, autotune)
    result.configs = triton_pedconv.best_configs() if autotune else {}
    result.ms = measure(fns, device, warmup=warmup, repeats=repeats)
    for kind in ("fwd", "train"):
        base = result.ms["static_" + kind]
        for path in ("triton", "fold"):
            if f"{path}_{kind}" in result.ms:
                result.ratios[f"{path}_{kind}"] = result.ms[f"{path}_{kind}"] / base
    return result


def _layer_errors(leaves: List[Tensor], grad_out: Tensor, geometry: Geometry, autotune: bool) -> Dict[str, float]:
    """Relative errors of the Triton forward and gradients vs the float32 fold composite on the same device."""
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        want = fold_composite(*_operands(ref_leaves), *geometry)
        want_grads = torch.autograd.grad(want, ref_leaves, grad_out.float())
    got_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    got = pedconv_conv2d_triton(*_operands(got_leaves), *geometry, autotune=autotune)
    got_grads = torch.autograd.grad(got, got_leaves, grad_out)
    errors = {"forward": _rel(got, want)}
    for label, g, w in zip(("x", "weight", "gamma", "phi", "psi"), got_grads, want_grads):
        errors["grad_" + label] = _rel(g, w)
    return errors


def network_totals(results: Sequence[LayerResult]) -> Dict[str, Dict[str, float]]:
    """Per network: sum over its layers of count x time, and the Triton / cuDNN ratios (convs only)."""
    totals: Dict[str, Dict[str, float]] = {}
    for r in results:
        net, count = r.layer["net"], r.layer["count"]
        agg = totals.setdefault(net, {})
        for key, ms in r.ms.items():
            agg[key + "_ms"] = agg.get(key + "_ms", 0.0) + count * ms
    for agg in totals.values():
        for kind in ("fwd", "train"):
            for path in ("triton", "fold"):
                if f"{path}_{kind}_ms" in agg:
                    agg[f"{path}_{kind}_ratio"] = agg[f"{path}_{kind}_ms"] / agg[f"static_{kind}_ms"]
    return totals


# ---------------------------------------------------------------------------------------------- report
def _fmt(value: Optional[float], spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: Dict[str, Any]) -> str:
    lines = [f"# Triton PEDConv check ({report['env'].get('device', '?')})", ""]
    env = report["env"]
    lines.append(f"torch {env.get('torch')}, triton {env.get('triton')}, batch {report['args']['batch']}, "
                 f"{report['args']['dtype']} {report['args']['memory_format']}, tiles {report['args']['tiles']}")
    lines.append("")
    if report.get("exactness"):
        lines += ["## Exactness (vs float64 reference of Eq. 2)", "", "| case | worst rel err | tol | ok |",
                  "| --- | --- | --- | --- |"]
        for row in report["exactness"]:
            lines.append(f"| {row['case']} | {max(row['errors'].values()):.2e} | {row['tolerance']:.0e} | "
                         f"{'yes' if row['passed'] else 'NO'} |")
        lines.append("")
    layers = report.get("layers", [])
    if layers:
        fold = any("fold_fwd" in r["ms"] for r in layers)
        head = "| layer | n | cuDNN fwd ms | Triton fwd ms | ratio | cuDNN train ms | Triton train ms | ratio |"
        rule = "| --- | --- | --- | --- | --- | --- | --- | --- |"
        if fold:
            head += " fold train ratio |"
            rule += " --- |"
        lines += ["## Layers (ratios to cuDNN in the same run; train = forward + backward)", "",
                  head + " worst rel err | tiles (fwd / bwd-input / bwd-weight) |", rule + " --- | --- |"]
        for r in layers:
            ms, ratios = r["ms"], r["ratios"]
            row = (f"| {r['layer']['name']} | {r['layer']['count']} | {_fmt(ms.get('static_fwd'))} | "
                   f"{_fmt(ms.get('triton_fwd'))} | {_fmt(ratios.get('triton_fwd'), '.2f')} | "
                   f"{_fmt(ms.get('static_train'))} | {_fmt(ms.get('triton_train'))} | "
                   f"{_fmt(ratios.get('triton_train'), '.2f')} |")
            if fold:
                row += f" {_fmt(ratios.get('fold_train'), '.2f')} |"
            tiles = " / ".join(_short_config(r["configs"].get(k)) for k in ("fwd", "bwd_input", "bwd_weight"))
            row += f" {max(r['errors'].values()):.1e} | {tiles} |"
            lines.append(row)
        lines.append("")
        lines += ["## Networks (convolutions only: sum of count x layer time)", "",
                  "| net | cuDNN fwd ms | Triton fwd ratio | cuDNN train ms | Triton train ratio |",
                  "| --- | --- | --- | --- | --- |"]
        for net, agg in report.get("networks", {}).items():
            lines.append(f"| {net} | {agg['static_fwd_ms']:.2f} | {_fmt(agg.get('triton_fwd_ratio'), '.2f')} | "
                         f"{agg['static_train_ms']:.2f} | {_fmt(agg.get('triton_train_ratio'), '.2f')} |")
        lines.append("")
    if report.get("skipped"):
        lines += ["Not measured (time budget): " + ", ".join(report["skipped"]), ""]
    return "\n".join(lines)


def _short_config(text: Optional[str]) -> str:
    if not text:
        return "-"
    parts = dict(p.split(": ", 1) for p in text.split(", ") if ": " in p)
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    return ("x".join(parts.get(k, "?") for k in keys[:3])
            + f" w{parts.get('num_warps', '?')}s{parts.get('num_stages', '?')}")


def _environment(device: torch.device) -> Dict[str, Any]:
    env: Dict[str, Any] = {"torch": torch.__version__, "triton": triton_pedconv.triton_version(),
                           "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, capability=list(torch.cuda.get_device_capability(device)),
                   multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        env["device"] = "cpu"
    return env


# ------------------------------------------------------------------------------------------ ptx report
def ptx_report(tiles: Sequence[Tuple[int, int, int, int, int]], capability: int = 90) -> List[Dict[str, Any]]:
    """Compile every kernel for ``sm_<capability>`` without a GPU; registers, spills, shared memory, wgmma."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from image_classification.dynamic.pedconv import triton_kernels as kernels

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    target = GPUTarget("cuda", capability, 32)
    geometry = dict(KH=3, KW=3, SH=2, SW=2, PH=1, PW=1, DH=1, DW=1)
    flags = dict(HAS_GAMMA=True, HAS_PHI=True, HAS_PSI=True, DOT_FP32=False, INPUT_PRECISION="ieee")
    fp32_ptrs = {"gamma_ptr", "phi_ptr", "psi_ptr", "gphi_ptr", "gpsi_ptr", "gw_ptr", "out_ptr"}
    jobs = []
    for m, n, k, stages, warps in tiles:
        tile = dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8)
        jobs.append(("fwd", kernels.pedconv_fwd_kernel, dict(geometry, **flags, STORE_Z=True, **tile), stages, warps))
        jobs.append(("bwd_input", kernels.pedconv_bwd_input_kernel,
                     dict(geometry, **flags, STORE_GX=True, NEED_GPHI=True, NEED_GPSI=True, TAPS_P2=16, **tile),
                     stages, warps))
        jobs.append(("bwd_weight", kernels.pedconv_bwd_weight_kernel, dict(geometry, **flags, **tile), stages, warps))
    jobs.append(("grad_gamma", kernels.pedconv_grad_gamma_kernel, dict(BLOCK_P=64, BLOCK_O=64), 1, 4))
    # Triton >= 3.3 names the constexpr values ``constexprs``; 3.2 (torch 2.6's) ``constants``
    consts_keyword = "constexprs" if "constexprs" in inspect.signature(ASTSource.__init__).parameters else "constants"
    rows = []
    for name, kernel, consts, stages, warps in jobs:
        fn = kernel if type(kernel).__name__ == "JITFunction" else triton.runtime.jit.JITFunction(kernel.fn)
        signature = {arg: ("constexpr" if arg in consts else ("*fp32" if arg in fp32_ptrs else "*fp16")
                           if arg.endswith("_ptr") else "i32") for arg in fn.arg_names}
        row: Dict[str, Any] = dict(kernel=name, tile={k: v for k, v in consts.items() if k.startswith("BLOCK")},
                                   num_stages=stages, num_warps=warps)
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, **{consts_keyword: consts}), target=target,
                                      options=dict(num_warps=warps, num_stages=stages))
            ptx = compiled.asm["ptx"]
            row.update(wgmma="wgmma" in ptx, shared_bytes=int(compiled.metadata.shared))
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
                handle.write(ptx)
            log = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{capability}a", handle.name,
                                  "-o", os.devnull], capture_output=True, text=True).stderr
            os.unlink(handle.name)
            regs, spills = re.search(r"Used (\d+) registers", log), re.search(r"(\d+) bytes spill stores", log)
            row.update(registers=int(regs.group(1)) if regs else None,
                       spill_bytes=int(spills.group(1)) if spills else None)
        except Exception as exc:  # report, do not stop: one failing tile must not hide the others
            row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        print(f"ptx {name:10s} {row['tile']} w{warps} s{stages}: "
              + (row.get("error") or f"regs {row.get('registers')} spill {row.get('spill_bytes')} B "
                 f"smem {row.get('shared_bytes')} wgmma {row.get('wgmma')}"), flush=True)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m image_classification.tools.triton_pedconv_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--nets", default="resnet18,resnet50", help="comma-separated archs (default: %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=64, help="batch size of the layer timings (default: 64)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="fp16", help="timing dtype (default: fp16)")
    parser.add_argument("--memory-format", choices=("nhwc", "nchw"), default="nhwc",
                        help="timing layout (default: nhwc = channels_last)")
    parser.add_argument("--tiles", choices=("heuristic", "small", "full"), default="small",
                        help="GPU tiles: heuristic (no autotuning), small (3 candidates) or full "
                             "(triton_pedconv.AUTOTUNE_TILES) (default: small)")
    parser.add_argument("--fold", action="store_true", help="also time the grouped-conv fold path in torch")
    parser.add_argument("--repeats", type=positive_int, default=7, help="interleaved samples per timing (default: 7)")
    parser.add_argument("--warmup", type=positive_int, default=3, help="warm-up calls per timed function (default: 3)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="stop starting new layers after this many seconds (default: 420)")
    parser.add_argument("--skip-exactness", action="store_true", help="skip the small exactness cases")
    parser.add_argument("--smoke", action="store_true", help="two tiny layers, batch 2 (tests the script; CPU ok)")
    parser.add_argument("--ptx-report", action="store_true",
                        help="only compile the kernels for sm_90 and report registers/spills (no GPU needed)")
    args = parser.parse_args(argv)
    return args


def _write(out_dir: str, report: Dict[str, Any]) -> None:
    write_json_atomic(os.path.join(out_dir, "triton_pedconv_check.json"), report)
    with replaced_atomically(os.path.join(out_dir, "triton_pedconv_check.md")) as tmp:
        tmp.write_text(markdown(report))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    started = time.monotonic()
    tiles = {"heuristic": None, "small": SMALL_TILES, "full": triton_pedconv.AUTOTUNE_TILES}[args.tiles]
    if args.ptx_report:
        rows = ptx_report(tiles or HEURISTIC_TILE)
        with open(os.path.join(args.out, "triton_pedconv_ptx.json"), "w") as handle:
            json.dump(rows, handle, indent=1)
        return 1 if any("error" in r for r in rows) else 0

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = unavailable_reason(device)
    if reason is not None:
        print(f"triton_pedconv_check: error: {reason}", file=sys.stderr)
        return 2
    if tiles is not None:
        triton_pedconv.AUTOTUNE_TILES = tuple(tiles)
    autotune = tiles is not None
    batch = 2 if args.smoke else args.batch
    report: Dict[str, Any] = {"env": _environment(device), "args": vars(args) | {"batch": batch},
                              "exactness": [], "layers": [], "networks": {}, "skipped": []}
    from image_classification.training.logger import RaportWriter

    raport = RaportWriter(os.path.join(args.out, "raport.json"))
    raport.log_parameters({k: str(v) for k, v in report["args"].items()})
    try:
        if not args.skip_exactness:
            cases = EXACTNESS_CASES[:2] if args.smoke else EXACTNESS_CASES
            report["exactness"] = check_exactness(device, cases)
            _write(args.out, report)
        layers = smoke_layers() if args.smoke else [s for net in args.nets.split(",") if net
                                                     for s in network_layers(net.strip())]
        dtype = _DTYPES[args.dtype]
        for index, spec in enumerate(layers):
            if time.monotonic() - started > args.budget_s:
                report["skipped"].append(spec.name)
                continue
            t0 = time.monotonic()
            result = time_layer(spec, batch, dtype, args.memory_format == "nhwc", device, autotune, args.fold,
                                repeats=args.repeats, warmup=args.warmup)
            report["layers"].append(asdict(result))
            report["networks"] = network_totals([LayerResult(**r) for r in report["layers"]])
            _write(args.out, report)
            raport.log([index], {"layer": spec.name, **{f"{k}_ms": v for k, v in result.ms.items()},
                                 **{f"{k}_ratio": v for k, v in result.ratios.items()},
                                 "worst_rel_err": max(result.errors.values())})
            print(f"[{index + 1}/{len(layers)}] {spec.name:26s} x{spec.count}: fwd {result.ratios['triton_fwd']:.2f}x "
                  f"train {result.ratios['triton_train']:.2f}x cuDNN "
                  f"(static train {result.ms['static_train']:.3f} ms), "
                  f"rel err {max(result.errors.values()):.1e}, {time.monotonic() - t0:.0f}s", flush=True)
    finally:
        report["elapsed_s"] = time.monotonic() - started
        _write(args.out, report)
        raport.log([], {"elapsed_s": report["elapsed_s"]})
        raport.close()
    print(markdown(report))
    failed = [r["case"] for r in report["exactness"] if not r["passed"]]
    layer_tol = 3e-2 if args.dtype == "bf16" else 1e-2
    bad_layers = [r["layer"]["name"] for r in report["layers"] if not max(r["errors"].values()) <= layer_tol]
    if failed or bad_layers:
        print(f"triton_pedconv_check: exactness failed: {failed + bad_layers}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_program(main)
