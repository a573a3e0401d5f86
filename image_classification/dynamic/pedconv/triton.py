"""Fused Triton path of the multiplicative rank-1 PEDConv convolution (PEDConv, BMVC 2021, Eq. 2).

For one sample b the dynamic weight is ``W_b = W_base * (gamma_b o phi_b o psi_b)`` and::

    conv(x_b, W_b) = gamma_b * conv(phi_b * x_b, W_base * psi_b)

:func:`pedconv_conv2d_triton` computes exactly that with implicit-GEMM Triton kernels that scale each
loaded input element by ``phi[b, c] * psi[b, tap]`` on the fly and apply ``gamma[b, o]`` in the
epilogue: the FLOPs and (up to the small factor tables) the memory traffic of the static convolution,
and no per-sample weight (nor, in the backward, any per-sample weight gradient) is ever materialized.
Backward kernels (:mod:`.triton_kernels`): grad-input with grad-phi and grad-psi fused in
(one transposed implicit GEMM, strided convolutions split into sub-pixel classes), grad-W_base
(implicit GEMM over the whole batch with split-K), and a reduction for grad-gamma over the saved
pre-gamma output.

Supported: groups = 1, any stride/padding/dilation, fp32/fp16/bf16 inputs (fp32 accumulation; fp32
dots follow cuDNN's TF32 setting), NCHW and channels_last (the output takes the input's memory format;
channels_last is the fast layout on a GPU), autocast (x and W_base are cast to the autocast dtype as
``F.conv2d`` does). Any of gamma/phi/psi may be None (all ones: a left-out component, PEDConv Table 5a).

Where it runs (:func:`is_available`): compiled on a CUDA device, or anywhere in Triton's interpreter
when ``TRITON_INTERPRET=1`` is set before triton is first imported (that is how CI tests it on CPU;
tests/conftest.py sets it when CUDA is absent).
On a GPU, tile sizes are autotuned per layer shape (``triton.autotune``; ``autotune=False`` uses a
fixed heuristic tile instead). The backward adds float32 partial sums with atomics (grad-W_base
split-K, grad-phi, grad-psi), so it is not bitwise deterministic:
``torch.use_deterministic_algorithms(True)`` makes it raise (or warn with ``warn_only``).

Forward and backward are ``torch.library`` custom operators with fake implementations, so that
``torch.compile(fullgraph=True)`` traces callers without a graph break. PEDConv2d runs it as its
``triton`` path (registered in :mod:`.paths` with ``triton_applicable`` and ``triton_unsupported_reason``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ...compat import cudnn_conv_allows_tf32, custom_op
from ..functional import conv_output_size

__all__ = [
    "best_configs",
    "pedconv_conv2d_triton",
    "is_available",
    "unavailable_reason",
    "triton_version",
    "tile_mode",
    "interpreting",
    "SUPPORTED_DTYPES",
]

IntPair = Union[int, Sequence[int]]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1
#: tiles used in Triton's interpreter (CPU tests). The interpreter's cost is per operation, not per
#: element, so these are as large as a test shape that still spans several tiles allows.
INTERPRET_TILES: Dict[str, Dict[str, int]] = {
    "fwd": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2},
    "bwd_input": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2},
    "bwd_weight": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2},
    "grad_gamma": {"BLOCK_P": 64, "BLOCK_O": 32},
}
#: grad-W_base split-K: aim at this many programs per multiprocessor, each split at least this many K blocks
_SPLIT_K_WAVES = 2
_SPLIT_K_MIN_BLOCKS = 4
_KERNELS: Dict[str, Any] = {}  # explicit cache: the kernels module and its autotuned wrappers


# --------------------------------------------------------------------------------------- availability
def triton_version() -> Optional[str]:
    """The installed Triton's version, or None when Triton cannot be imported."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        import triton
    except Exception:  # a broken install counts as absent
        return None
    return str(getattr(triton, "__version__", "unknown"))


def interpreting() -> bool:
    """Whether the kernels run (or, not loaded yet, will run) in Triton's interpreter."""
    if "module" in _KERNELS:
        return bool(_KERNELS["interpret"])
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: Union[str, torch.device, None] = None) -> Optional[str]:
    """Why :func:`pedconv_conv2d_triton` cannot run on ``device`` (None: it can)."""
    if triton_version() is None:
        return "triton is not installed (it ships with the CUDA builds of torch)"
    if interpreting():
        import triton.language as tl

        if type(tl.cdiv).__name__ == "JITFunction":  # triton was imported before TRITON_INTERPRET=1 was set
            return "TRITON_INTERPRET=1 must be set before triton is first imported"
        return _interpreter_reason()
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        return f"device {dev.type!r} needs TRITON_INTERPRET=1 (Triton's interpreter); compiled kernels need CUDA"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if torch.cuda.get_device_capability(dev) < (7, 0):
        return "the GPU is older than compute capability 7.0 (no tensor cores for tl.dot)"
    return None


def _interpreter_reason() -> Optional[str]:
    """None where Triton's interpreter runs the kernels' loops, else why not (probed once per process)."""
    if "interpreter_reason" not in _KERNELS:
        module = importlib.import_module(".triton_kernels", __package__)
        out = torch.zeros(1, dtype=torch.int32)
        try:
            module.loop_bound_probe_kernel[(1,)](out, 10, BLOCK=4)
            failure = None if int(out[0]) == 3 else f"counted {int(out[0])} iterations instead of 3"
        except Exception as exc:  # noqa: BLE001 (whatever the interpreter raises, the kernels cannot run)
            failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if failure is None:
            _KERNELS["interpreter_reason"] = None
        else:
            import numpy

            _KERNELS["interpreter_reason"] = (
                f"Triton {triton_version()}'s interpreter cannot run the kernels' loops with numpy {numpy.__version__} "
                f"({failure}); install numpy 1.x (pip install 'numpy<2') or a torch that ships a newer Triton")
    return _KERNELS["interpreter_reason"]


def is_available(device: Union[str, torch.device, None] = None) -> bool:
    """True when the Triton kernels can run on ``device``: Triton importable and a CUDA device (compiled
    kernels), or any device when the interpreter is on (``TRITON_INTERPRET=1`` before first use)."""
    return unavailable_reason(device) is None


def _kernels() -> ModuleType:
    if "module" not in _KERNELS:
        reason = unavailable_reason(None) if interpreting() else None
        if reason is not None:
            raise RuntimeError(f"pedconv_conv2d_triton: {reason}")
        module = importlib.import_module(".triton_kernels", __package__)
        _KERNELS["interpret"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
        _KERNELS["module"] = module
    return _KERNELS["module"]


# ------------------------------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class _Geometry:
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int
    dw: int
    ho: int
    wo: int

    @property
    def taps(self) -> int:
        return self.kh * self.kw

    def constexprs(self) -> Dict[str, int]:
        return dict(KH=self.kh, KW=self.kw, SH=self.sh, SW=self.sw, PH=self.ph, PW=self.pw, DH=self.dh, DW=self.dw)


def _pair(name: str, value: IntPair, minimum: int) -> Tuple[int, int]:
    if isinstance(value, bool) or isinstance(value, str):
        raise ValueError(f"pedconv_conv2d_triton: {name} must be an int or a pair of ints, got {value!r}")
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"pedconv_conv2d_triton: {name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"pedconv_conv2d_triton: {name} must be >= {minimum}, got {value!r}")
    return pair[0], pair[1]


def _check_factor(name: str, value: Optional[Tensor], batch: int, dim: int, x: Tensor,
                  shapes: Tuple[Tuple[int, ...], ...]) -> Optional[Tensor]:
    if value is None:
        return None
    if not isinstance(value, Tensor):
        raise ValueError(f"pedconv_conv2d_triton: {name} must be a tensor or None, got {type(value).__name__}")
    if tuple(value.shape) not in shapes:
        wanted = " or ".join(str(s) for s in shapes)
        raise ValueError(f"pedconv_conv2d_triton: {name} must have shape {wanted}, got {tuple(value.shape)}")
    if value.device != x.device:
        raise ValueError(f"pedconv_conv2d_triton: {name} is on {value.device}, x on {x.device}")
    if value.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"pedconv_conv2d_triton: {name} must be float32/float16/bfloat16, got {value.dtype}")
    return value.reshape(batch, dim).contiguous()


def _geometry(x: Tensor, weight: Tensor, stride: IntPair, padding: IntPair, dilation: IntPair) -> _Geometry:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"pedconv_conv2d_triton: x must be a 4-D tensor B x C x H x W, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError("pedconv_conv2d_triton: weight must be a 4-D tensor C_out x C_in x kh x kw")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"pedconv_conv2d_triton: weight has {weight.shape[1]} input channels, x has {x.shape[1]} "
                         "(only groups = 1 is supported)")
    if weight.device != x.device:
        raise ValueError(f"pedconv_conv2d_triton: weight is on {weight.device}, x on {x.device}")
    sh, sw = _pair("stride", stride, 1)
    ph, pw = _pair("padding", padding, 0)
    dh, dw = _pair("dilation", dilation, 1)
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    height, width = int(x.shape[2]), int(x.shape[3])
    ho, wo = conv_output_size((height, width), (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    if ho <= 0 or wo <= 0 or min(x.shape) == 0 or min(weight.shape) == 0:
        raise ValueError(f"pedconv_conv2d_triton: empty input or output (x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}, output {ho}x{wo})")
    batch, out_channels = int(x.shape[0]), int(weight.shape[0])
    for what, count in (("x per sample", x[0].numel()), ("output per sample", out_channels * ho * wo),
                        ("output pixels B*H_out*W_out", batch * ho * wo),
                        ("input pixels B*H*W", batch * height * width)):
        if count > _INT32_MAX:
            raise ValueError(f"pedconv_conv2d_triton: {what} ({count}) exceeds the kernels' int32 indexing")
    return _Geometry(kh, kw, sh, sw, ph, pw, dh, dw, ho, wo)


def _memory_format(x: Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _dot_options(dtype: torch.dtype) -> Dict[str, Any]:
    interpret = interpreting()  # asked before the first launch has loaded the kernels, too
    precision = "tf32" if dtype == torch.float32 and not interpret and cudnn_conv_allows_tf32() else "ieee"
    # the interpreter's tl.dot mishandles bfloat16 operands: give it the rounded operands as float32
    # (bf16 x bf16 products are exact in float32, so the result is the same)
    return dict(DOT_FP32=interpret and dtype == torch.bfloat16, INPUT_PRECISION=precision)


# ------------------------------------------------------------------------------------ tiles, autotune
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


#: candidate GPU tiles for ``triton.autotune``: BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps. A check
#: or a benchmark may replace this tuple before the first call (the tuned wrappers are built then).
AUTOTUNE_TILES: Tuple[Tuple[int, int, int, int, int], ...] = (
    # ordered by the sm_90 ptxas report (python -m image_classification.tools.triton_pedconv_check
    # --ptx-report): 8-warp tiles spill least; every tile with BLOCK_M >= 64 uses wgmma
    (128, 64, 32, 3, 8),
    (64, 128, 32, 3, 8),
    (128, 128, 32, 3, 8),
    (64, 64, 32, 3, 4),
    (128, 64, 32, 4, 4),
    (64, 64, 64, 3, 4),
    (256, 64, 32, 3, 8),
    (32, 64, 32, 4, 4),
)
#: autotuner timing per candidate (milliseconds of warm-up and of repetitions, ``triton.testing.do_bench``)
AUTOTUNE_BENCH_MS = (5, 25)
#: environment variable choosing the tiles of the ``triton`` PEDConv path: ``full`` (default: every tile of
#: AUTOTUNE_TILES is a candidate), ``small`` (the first 3: a third of the compilations per new layer shape)
#: or ``heuristic`` (no tuning, the fixed heuristic tile; no benchmarking on first use)
TILES_ENV = "PEDCONV_TRITON_TILES"
_TILE_MODES = ("full", "small", "heuristic")


def tile_mode() -> str:
    """The ``PEDCONV_TRITON_TILES`` setting (ValueError naming the variable when it is not a known mode)."""
    mode = os.environ.get(TILES_ENV, "full").strip().lower() or "full"
    if mode not in _TILE_MODES:
        raise ValueError(f"{TILES_ENV}={mode!r}: expected one of {', '.join(_TILE_MODES)}")
    return mode


def _gemm_configs() -> List[Any]:
    import triton

    tiles = AUTOTUNE_TILES[:3] if tile_mode() == "small" else AUTOTUNE_TILES
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for m, n, k, s, w in tiles]


def _autotune(configs: List[Any], key: List[str], prune: Optional[Callable[..., List[Any]]] = None) -> Any:
    """``triton.autotune`` with short timings and, where this Triton has them, an on-disk result cache."""
    import inspect

    import triton

    params = inspect.signature(triton.autotune).parameters
    kwargs: Dict[str, Any] = {}
    warmup_ms, rep_ms = AUTOTUNE_BENCH_MS
    if "do_bench" in params:
        from triton.testing import do_bench

        def bench(fn: Callable[[], Any], quantiles: Any = None) -> Any:
            return do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=quantiles)

        kwargs["do_bench"] = bench
    else:  # Triton 3.0
        kwargs.update(warmup=warmup_ms, rep=rep_ms)
    if "cache_results" in params:
        kwargs["cache_results"] = True
    if prune is not None:
        kwargs["prune_configs_by"] = {"early_config_prune": prune}
    return triton.autotune(configs, key=key, **kwargs)


def _pruner(m_arg: Optional[str], n_arg: str, k_arg: Optional[str]) -> Callable[..., List[Any]]:
    """Drop tiles much larger than the layer (a 64-channel layer gains nothing from 256-wide tiles)."""

    def prune(configs: List[Any], named_args: Dict[str, Any], **_: Any) -> List[Any]:
        def fits(cfg: Any) -> bool:
            kw = cfg.kwargs
            ok = kw["BLOCK_N"] <= max(16, _next_pow2(named_args[n_arg]))
            if k_arg is not None:
                ok = ok and kw["BLOCK_K"] <= max(16, _next_pow2(named_args[k_arg]))
            if m_arg is not None:
                ok = ok and kw["BLOCK_M"] <= max(16, _next_pow2(named_args[m_arg]))
            return ok

        kept = [cfg for cfg in configs if fits(cfg)]
        if kept:
            return kept
        return [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]

    return prune


def _heuristic_tile(m: int, n: int, k: int) -> Dict[str, int]:
    """The untuned GPU tile (``autotune=False``): 128 x 64 x 32 with 8 warps and 3 stages (the tile
    with no register spills in the sm_90 forward and grad-W kernels), 128 wide for >= 512 channels."""
    block_m = 128 if m >= 128 else 64
    block_n = 128 if n >= 512 else 64
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 32, "GROUP_M": 8, "num_stages": 3,
            "num_warps": 8 if block_m * block_n >= 128 * 64 else 4}


def _zero_buffers(*names: str) -> Callable[[Dict[str, Any]], None]:
    def hook(nargs: Dict[str, Any]) -> None:
        for name in names:
            nargs[name].zero_()

    return hook


def _tuned(name: str) -> Any:
    """The autotuned wrapper of kernel ``name`` (built once; only used for compiled kernels)."""
    key = "tuned_" + name
    if key not in _KERNELS:
        module = _kernels()
        geometry = ["KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW"]
        if name == "fwd":
            fn = _autotune(_gemm_configs(), ["B", "C", "H", "W", "CO", "HO", "WO", "stride_xc", "STORE_Z"] + geometry,
                           _pruner(None, "CO", "C"))(module.pedconv_fwd_kernel)
        elif name == "bwd_input":
            # the atomically accumulated buffers are zeroed before every launch (tuning runs included)
            fn = _autotune([_with_hook(c, _zero_buffers("gphi_ptr", "gpsi_ptr")) for c in _gemm_configs()],
                           ["B", "C", "H", "W", "CO", "HO", "WO", "stride_go", "stride_xc", "STORE_GX", "NEED_GPHI",
                            "NEED_GPSI"] + geometry,
                           _pruner(None, "C", "CO"))(module.pedconv_bwd_input_kernel)
        elif name == "bwd_weight":
            fn = _autotune([_with_hook(c, _zero_buffers("gw_ptr")) for c in _gemm_configs()],
                           ["B", "C", "H", "W", "CO", "HO", "WO", "stride_go", "stride_xc"] + geometry,
                           _pruner("CO", "C", None))(module.pedconv_bwd_weight_kernel)
        else:
            import triton

            fn = _autotune([triton.Config({"BLOCK_P": p, "BLOCK_O": o}, num_warps=w)
                            for p, o, w in ((64, 64, 4), (128, 32, 4), (32, 128, 4), (128, 64, 8))],
                           ["CO", "HO", "WO", "stride_go"])(module.pedconv_grad_gamma_kernel)
        _KERNELS[key] = fn
    return _KERNELS[key]


def best_configs() -> Dict[str, str]:
    """The tile autotuning chose for each kernel that has run autotuned in this process (kernel -> config)."""
    out = {}
    for name in ("fwd", "bwd_input", "bwd_weight", "grad_gamma"):
        config = getattr(_KERNELS.get("tuned_" + name), "best_config", None)
        if config is not None:
            out[name] = str(config)
    return out


def _with_hook(config: Any, hook: Callable[[Dict[str, Any]], None]) -> Any:
    config.pre_hook = hook
    return config


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda" and not interpreting():
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 4


def _split_k(pixels: int, tiles: int, block_k: int, device: torch.device) -> int:
    """grad-W_base split-K factor: enough programs for ``_SPLIT_K_WAVES`` per multiprocessor, while
    every split keeps at least ``_SPLIT_K_MIN_BLOCKS`` K blocks."""
    wanted = -(-_SPLIT_K_WAVES * _sm_count(device) // tiles)
    most = max(1, pixels // (_SPLIT_K_MIN_BLOCKS * block_k))
    return max(1, min(wanted, most))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch(kernel_name: str, grid: Callable[[Dict[str, Any]], Tuple[int, ...]], args: Sequence[Any],
            consts: Dict[str, Any], autotune: bool, shape: Tuple[int, int, int], zero: Sequence[Tensor] = ()) -> None:
    """Run kernel ``kernel_name`` with the interpreter tile, the autotuner, or the heuristic tile."""
    module = _kernels()
    raw = getattr(module, {"fwd": "pedconv_fwd_kernel", "bwd_input": "pedconv_bwd_input_kernel",
                           "bwd_weight": "pedconv_bwd_weight_kernel",
                           "grad_gamma": "pedconv_grad_gamma_kernel"}[kernel_name])
    if _KERNELS["interpret"]:
        meta: Dict[str, Any] = dict(INTERPRET_TILES[kernel_name])
        for buf in zero:
            buf.zero_()
        raw[grid(meta)](*args, **consts, **meta)
    elif autotune:
        _tuned(kernel_name)[grid](*args, **consts)  # zeroing: the configs' pre_hook
    else:
        if kernel_name == "grad_gamma":
            meta = {"BLOCK_P": 64, "BLOCK_O": 64, "num_warps": 4}
        else:
            meta = _heuristic_tile(*shape)
        for buf in zero:
            buf.zero_()
        raw[grid(meta)](*args, **consts, **meta)


# ------------------------------------------------------------------------------------------ launchers
def _forward(x: Tensor, weight: Tensor, gamma: Optional[Tensor], phi: Optional[Tensor], psi: Optional[Tensor],
             geo: _Geometry, store_z: bool, autotune: bool) -> Tuple[Tensor, Optional[Tensor]]:
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    y = torch.empty((batch, out_channels, geo.ho, geo.wo), dtype=x.dtype, device=x.device,
                    memory_format=_memory_format(x))
    z = torch.empty_like(y) if store_z else None
    dummy = y  # never dereferenced: its HAS_* / STORE_* flag is off
    rows = batch * geo.ho * geo.wo

    def grid(meta: Dict[str, Any]) -> Tuple[int, ...]:
        return (_cdiv(rows, meta["BLOCK_M"]) * _cdiv(out_channels, meta["BLOCK_N"]),)

    args = (x, weight, gamma if gamma is not None else dummy, phi if phi is not None else dummy,
            psi if psi is not None else dummy, y, z if z is not None else dummy,
            batch, channels, height, width, out_channels, geo.ho, geo.wo,
            *x.stride(), *weight.stride(), *y.stride())
    consts = dict(geo.constexprs(), HAS_GAMMA=gamma is not None, HAS_PHI=phi is not None, HAS_PSI=psi is not None,
                  STORE_Z=store_z, **_dot_options(x.dtype))
    _launch("fwd", grid, args, consts, autotune, (rows, out_channels, channels))
    return y, z


def _backward_input(grad: Tensor, x: Tensor, weight: Tensor, gamma: Optional[Tensor], phi: Optional[Tensor],
                    psi: Optional[Tensor], geo: _Geometry, need_x: bool, need_phi: bool, need_psi: bool,
                    autotune: bool) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    gx = torch.empty_like(x, memory_format=_memory_format(x)) if need_x else None
    f32, device = torch.float32, x.device
    gphi = torch.empty((batch, channels) if need_phi else 1, dtype=f32, device=device)
    gpsi = torch.empty((batch, geo.taps) if need_psi else 1, dtype=f32, device=device)
    hq, wq = _cdiv(height, geo.sh), _cdiv(width, geo.sw)
    rows = batch * hq * wq

    def grid(meta: Dict[str, Any]) -> Tuple[int, ...]:
        return (_cdiv(rows, meta["BLOCK_M"]) * _cdiv(channels, meta["BLOCK_N"]), geo.sh * geo.sw)

    dummy = grad
    gx_arg = gx if gx is not None else x
    args = (grad, weight, x, gamma if gamma is not None else dummy, phi if phi is not None else dummy,
            psi if psi is not None else dummy, gx_arg, gphi, gpsi,
            batch, channels, height, width, out_channels, geo.ho, geo.wo, hq, wq,
            *grad.stride(), *weight.stride(), *x.stride(), *gx_arg.stride())
    consts = dict(geo.constexprs(), HAS_GAMMA=gamma is not None, HAS_PHI=phi is not None, HAS_PSI=psi is not None,
                  STORE_GX=need_x, NEED_GPHI=need_phi, NEED_GPSI=need_psi, TAPS_P2=max(2, _next_pow2(geo.taps)),
                  **_dot_options(x.dtype))
    _launch("bwd_input", grid, args, consts, autotune, (rows, channels, out_channels), zero=(gphi, gpsi))
    return gx, (gphi if need_phi else None), (gpsi if need_psi else None)


def _backward_weight(grad: Tensor, x: Tensor, weight: Tensor, gamma: Optional[Tensor], phi: Optional[Tensor],
                     psi: Optional[Tensor], geo: _Geometry, autotune: bool) -> Tensor:
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    # float32 accumulator laid out O x KH x KW x C (channels innermost, coalesced tile stores)
    gw = torch.empty((out_channels, geo.kh, geo.kw, channels), dtype=torch.float32, device=x.device)
    pixels = batch * geo.ho * geo.wo

    def grid(meta: Dict[str, Any]) -> Tuple[int, ...]:
        tiles = _cdiv(out_channels, meta["BLOCK_M"]) * _cdiv(channels, meta["BLOCK_N"])
        return (tiles, geo.taps, _split_k(pixels, tiles * geo.taps, meta["BLOCK_K"], x.device))

    dummy = grad
    args = (grad, x, gamma if gamma is not None else dummy, phi if phi is not None else dummy,
            psi if psi is not None else dummy, gw,
            batch, channels, height, width, out_channels, geo.ho, geo.wo, *grad.stride(), *x.stride())
    consts = dict(geo.constexprs(), HAS_GAMMA=gamma is not None, HAS_PHI=phi is not None, HAS_PSI=psi is not None,
                  **_dot_options(x.dtype))
    _launch("bwd_weight", grid, args, consts, autotune, (out_channels, channels, pixels), zero=(gw,))
    return gw.permute(0, 3, 1, 2)


def _grad_gamma(grad: Tensor, z: Tensor, autotune: bool) -> Tensor:
    batch, out_channels, ho, wo = z.shape
    out = torch.empty((batch, out_channels), dtype=torch.float32, device=z.device)

    def grid(meta: Dict[str, Any]) -> Tuple[int, ...]:
        return (batch, _cdiv(out_channels, meta["BLOCK_O"]))

    args = (grad, z, out, out_channels, ho, wo, *grad.stride(), *z.stride())
    _launch("grad_gamma", grid, args, {}, autotune, (0, 0, 0))
    return out


def _check_deterministic() -> None:
    if torch.are_deterministic_algorithms_enabled():
        message = ("pedconv_conv2d_triton backward adds float32 partial sums with atomics and is not deterministic; "
                   "use another PEDConv path under torch.use_deterministic_algorithms(True)")
        if torch.is_deterministic_algorithms_warn_only_enabled():
            warnings.warn(message, stacklevel=3)
        else:
            raise RuntimeError(message)


# ------------------------------------------------------------------------------------------- autograd
# The forward and the backward are custom operators (``torch.library.custom_op``) with fake (meta)
# implementations, so that torch.compile traces them as opaque calls, ``fullgraph=True`` included:
# Dynamo cannot trace the Triton launches themselves (autotuned kernels with pre-hooks).
_OP_NAMESPACE = "pedconv_triton"


def _op_forward(x: Tensor, weight: Tensor, gamma: Optional[Tensor], phi: Optional[Tensor], psi: Optional[Tensor],
                stride: List[int], padding: List[int], dilation: List[int], store_z: bool,
                autotune: bool) -> Tuple[Tensor, Tensor]:
    """(y, z): the output and, when ``store_z``, the pre-gamma output grad-gamma needs (else empty)."""
    reason = unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"pedconv_conv2d_triton: {reason}")
    geo = _geometry(x, weight, stride, padding, dilation)
    w = weight if weight.stride(1) == 1 else weight.contiguous(memory_format=torch.channels_last)
    y, z = _forward(x, w, gamma, phi, psi, geo, store_z, autotune)
    return y, (z if z is not None else x.new_empty(0))


def _fake_output(x: Tensor, weight: Tensor, geo_hw: Tuple[Any, Any]) -> Tensor:
    return torch.empty((x.shape[0], weight.shape[0], geo_hw[0], geo_hw[1]), dtype=x.dtype, device=x.device,
                       memory_format=_memory_format(x))


def _output_hw(
    x: Tensor, weight: Tensor, stride: List[int], padding: List[int], dilation: List[int]
) -> Tuple[Any, Any]:
    return conv_output_size((x.shape[2], x.shape[3]), (weight.shape[2], weight.shape[3]), stride, padding, dilation)


def _fake_forward(x: Tensor, weight: Tensor, gamma: Optional[Tensor], phi: Optional[Tensor], psi: Optional[Tensor],
                  stride: List[int], padding: List[int], dilation: List[int], store_z: bool,
                  autotune: bool) -> Tuple[Tensor, Tensor]:
    y = _fake_output(x, weight, _output_hw(x, weight, stride, padding, dilation))
    return y, (torch.empty_like(y) if store_z else x.new_empty(0))


def _op_backward(grad: Tensor, x: Tensor, weight: Tensor, gamma: Optional[Tensor], phi: Optional[Tensor],
                 psi: Optional[Tensor], z: Tensor, stride: List[int], padding: List[int], dilation: List[int],
                 need_x: bool, need_w: bool, need_gamma: bool, need_phi: bool, need_psi: bool,
                 autotune: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x, W_base, gamma, phi, psi (an empty tensor where not needed)."""
    _check_deterministic()
    geo = _geometry(x, weight, stride, padding, dilation)
    w = weight if weight.stride(1) == 1 else weight.contiguous(memory_format=torch.channels_last)
    need_phi = need_phi and phi is not None
    need_psi = need_psi and psi is not None
    gx = gw = ggamma = gphi = gpsi = None
    if need_x or need_phi or need_psi:
        gx, gphi, gpsi = _backward_input(grad, x, w, gamma, phi, psi, geo, need_x, need_phi, need_psi, autotune)
    if need_w:
        gw = _backward_weight(grad, x, w, gamma, phi, psi, geo, autotune).to(weight.dtype)
    if need_gamma and gamma is not None:
        ggamma = _grad_gamma(grad, z, autotune).to(gamma.dtype)
    if gphi is not None and phi is not None:  # gphi is returned only where phi exists (need_phi)
        gphi = gphi.to(phi.dtype)
    if gpsi is not None and psi is not None:
        gpsi = gpsi.to(psi.dtype)
    empty = x.new_empty(0)
    return tuple(t if t is not None else empty.clone() for t in (gx, gw, ggamma, gphi, gpsi))  # type: ignore[return-value]  # a 5-tuple; mypy sees a variable-length tuple


def _fake_backward(grad: Tensor, x: Tensor, weight: Tensor, gamma: Optional[Tensor], phi: Optional[Tensor],
                   psi: Optional[Tensor], z: Tensor, stride: List[int], padding: List[int], dilation: List[int],
                   need_x: bool, need_w: bool, need_gamma: bool, need_phi: bool, need_psi: bool,
                   autotune: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    out_c, in_c, kh, kw = weight.shape
    gx = torch.empty_like(x, memory_format=_memory_format(x)) if need_x else x.new_empty(0)
    # grad-W_base is computed as C_out x kh x kw x C_in and handed back permuted (no copy)
    gw = (torch.empty((out_c, kh, kw, in_c), dtype=weight.dtype, device=x.device).permute(0, 3, 1, 2)
          if need_w else x.new_empty(0))
    ggamma = gamma.new_empty(gamma.shape) if need_gamma and gamma is not None else x.new_empty(0)
    gphi = phi.new_empty(phi.shape) if need_phi and phi is not None else x.new_empty(0)
    gpsi = psi.new_empty(psi.shape) if need_psi and psi is not None else x.new_empty(0)
    return gx, gw, ggamma, gphi, gpsi


def _setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor]) -> None:
    x, weight, gamma, phi, psi, stride, padding, dilation, _store_z, autotune = inputs
    ctx.save_for_backward(x, weight, gamma, phi, psi, output[1])
    ctx.conv = (list(stride), list(padding), list(dilation), bool(autotune))


def _autograd_backward(ctx: Any, grad: Tensor, _grad_z: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    x, weight, gamma, phi, psi, z = ctx.saved_tensors
    stride, padding, dilation, autotune = ctx.conv
    needs = tuple(bool(n) for n in ctx.needs_input_grad[:5])
    grads = _BACKWARD_OP(grad, x, weight, gamma, phi, psi, z, stride, padding, dilation, *needs, autotune)
    return (*(g if n else None for g, n in zip(grads, needs)), None, None, None, None, None)


def _register_ops() -> Tuple[Any, Any]:
    forward = custom_op(f"{_OP_NAMESPACE}::conv2d", _op_forward)
    forward.register_fake(_fake_forward)
    backward = custom_op(f"{_OP_NAMESPACE}::conv2d_backward", _op_backward)
    backward.register_fake(_fake_backward)
    forward.register_autograd(_autograd_backward, setup_context=_setup_context)
    return forward, backward


_FORWARD_OP, _BACKWARD_OP = _register_ops()


# ---------------------------------------------------------------------------------------- public API
def pedconv_conv2d_triton(
    x: Tensor,
    weight: Tensor,
    gamma: Optional[Tensor],
    phi: Optional[Tensor],
    psi: Optional[Tensor],
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    *,
    autotune: bool = True,
) -> Tensor:
    """Rank-1 multiplicative PEDConv convolution (PEDConv, BMVC 2021, Eq. 2), fused in Triton.

    ``y[b] = conv(x[b], weight * (gamma[b] o phi[b] o psi[b]))``, computed as
    ``gamma[b] * conv(phi[b] * x[b], weight * psi[b])`` without forming any per-sample weight.

    Args:
        x: ``B x C_in x H x W`` (NCHW or channels_last; float32/float16/bfloat16).
        weight: W_base, ``C_out x C_in x kh x kw`` (groups = 1), same dtype as x (autocast casts both).
        gamma: ``B x C_out`` output-filter factors, or None (ones).
        phi: ``B x C_in`` input-filter factors, or None (ones).
        psi: ``B x kh*kw`` (or ``B x kh x kw``) kernel-position factors, or None (ones).
        stride, padding, dilation: as ``F.conv2d`` (int or pair; zero padding).
        autotune: on a GPU, pick tile sizes per shape with ``triton.autotune`` (first call per shape
            benchmarks the candidate tiles); False uses a fixed heuristic tile.

    Returns:
        ``B x C_out x H_out x W_out`` in x's dtype and memory format. Differentiable in all five tensors.
    """
    if not torch.compiler.is_compiling():  # traced: the operator itself checks when it runs
        reason = unavailable_reason(x.device if isinstance(x, Tensor) else None)
        if reason is not None:
            raise RuntimeError(f"pedconv_conv2d_triton: {reason}")
    geo = _geometry(x, weight, stride, padding, dilation)
    batch = int(x.shape[0])
    gamma = _check_factor("gamma", gamma, batch, int(weight.shape[0]), x, ((batch, int(weight.shape[0])),))
    phi = _check_factor("phi", phi, batch, int(x.shape[1]), x, ((batch, int(x.shape[1])),))
    psi = _check_factor("psi", psi, batch, geo.taps, x, ((batch, geo.taps), (batch, geo.kh, geo.kw)))
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"pedconv_conv2d_triton: x must be float32/float16/bfloat16, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise ValueError(f"pedconv_conv2d_triton: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    store_z = gamma is not None and gamma.requires_grad and torch.is_grad_enabled()
    y, _ = _FORWARD_OP(x, weight, gamma, phi, psi, [geo.sh, geo.sw], [geo.ph, geo.pw], [geo.dh, geo.dw], store_z,
                       bool(autotune))
    return y
