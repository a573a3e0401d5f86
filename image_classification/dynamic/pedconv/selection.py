"""How a ``path=auto`` PEDConv layer picks its execution path for one forward.

Every input a layer meets is described by a :class:`TuningKey` (everything a path's speed depends on:
geometry, options, input shape, dtypes, device type, layout, whether a backward follows; nothing rank- or
device-index-specific, so the DDP ranks of a job agree). :func:`resolve_path` looks the key up in the
autotuner (:mod:`..autotune`), which times the applicable paths of :data:`.paths.PATH_REGISTRY` on random
tensors of the key's shapes on its first use (:func:`timing_candidates`), or falls back to
:func:`.paths.heuristic_path`. Under ``torch.compile`` the look-up runs once, at trace time, as a constant.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import autotune
from .common import PEDConvLayer
from .kernels import compute_dtype
from .paths import PATH_REGISTRY, Factors, candidate_paths, heuristic_path

__all__ = ["KEY_REVISION", "STATIC_REFERENCE", "TuningKey", "forget_paths", "logged_paths", "register_layer",
           "resolve_path", "timing_candidates", "tuning_key"]

#: first item of a tuning key; a new revision when the paths' speeds change, so the tuning caches on disk
#: (keyed by the machine, not by this code) time them again instead of replaying stale choices
KEY_REVISION = "pedconv/2"
#: name of the nn.Conv2d timing the autotuner records next to the paths (never chosen)
STATIC_REFERENCE = "static"

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


class TuningKey(NamedTuple):
    """Everything a path's speed depends on. A tuple: the autotuner's caches (and their JSON files, which
    read keys back as plain tuples) hash and compare it as one, field by field in this order."""

    revision: str
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    groups: int
    rank: int
    components: str  # "gamma+phi+psi"
    reparam: str
    shape: Tuple[int, ...]  # input B x C x H x W
    dtype: str
    compute_dtype: str  # autocast's dtype, "-" outside autocast
    device: str  # device type
    channels_last: bool
    grad: bool  # a backward follows


def tuning_key(layer: PEDConvLayer, x: Tensor, grad: bool) -> Tuple[Any, ...]:
    """The key of one forward of ``layer`` on ``x``: the fields of :class:`TuningKey` as a plain tuple (what
    torch.compile passes into :func:`resolve_path` at trace time, which reads it as a :class:`TuningKey`)."""
    compute = compute_dtype(x)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return (
        KEY_REVISION, layer.in_channels, layer.out_channels, tuple(layer.kernel_size), tuple(layer.stride),
        tuple(layer.padding), tuple(layer.dilation), layer.groups, layer.rank, "+".join(layer.components),
        layer.reparam, tuple(int(s) for s in x.shape), _DTYPE_NAMES.get(x.dtype, "other"),
        _DTYPE_NAMES.get(compute, "other") if compute is not None else "-", x.device.type, channels_last, grad,
    )


# Layers by token, for the trace-time look-up (weak: layers are never kept alive by it), and what each layer's
# forwards used, by token: (input shape, backward follows) -> {"path", "source", "times_ms"}
_LAYERS: weakref.WeakValueDictionary[int, PEDConvLayer] = weakref.WeakValueDictionary()
_PATH_LOGS: Dict[int, Dict[Tuple[Tuple[int, ...], bool], Dict[str, Any]]] = {}
_TOKENS = itertools.count()


def register_layer(layer: PEDConvLayer) -> int:
    """A fresh token by which :func:`resolve_path` finds ``layer`` and its path log (a copy of a layer registers
    anew, with an empty log); the log goes when the layer does."""
    token = next(_TOKENS)
    _LAYERS[token] = layer
    _PATH_LOGS[token] = {}
    weakref.finalize(layer, _PATH_LOGS.pop, token, None)
    return token


def logged_paths(token: int) -> Dict[Tuple[Tuple[int, ...], bool], Dict[str, Any]]:
    """(input shape, backward follows) -> {"path", "source", "times_ms"} of the forwards of layer ``token``."""
    return dict(_PATH_LOGS.get(token, {}))


def forget_paths(token: int) -> None:
    """Empty the path log of layer ``token``."""
    _PATH_LOGS.get(token, {}).clear()


def _static_conv(layer: PEDConvLayer, x: Tensor, weight: Tensor, factors: Factors) -> Tensor:
    return F.conv2d(x, weight, None, groups=layer.groups, **layer.conv_kwargs())


def timing_candidates(layer: PEDConvLayer, key: TuningKey, names: Sequence[str]) -> Dict[str, Callable[[], Any]]:
    """Timing closures of ``names`` on random tensors of the key's shapes (no state of ``layer`` is touched)."""
    shape, grad = key.shape, key.grad
    dtype = _DTYPES_BY_NAME.get(key.dtype, layer.weight.dtype)
    device = layer.weight.device
    gen = torch.Generator(device=device).manual_seed(0)
    fmt = torch.channels_last if key.channels_last else torch.contiguous_format
    x = torch.randn(shape, generator=gen, dtype=dtype, device=device).contiguous(memory_format=fmt)
    weight = torch.randn(layer.weight.shape, generator=gen, dtype=dtype, device=device) * 0.1
    dims = layer.component_dims()
    comps = {name: 0.25 + 0.5 * torch.rand(shape[0], layer.rank, dim, generator=gen, dtype=dtype, device=device)
             for name, dim in dims.items()}
    leaves = [x, weight, *comps.values()]
    if grad:
        for t in leaves:
            t.requires_grad_(True)
    factors = Factors(comps.get("gamma"), comps.get("phi"), comps.get("psi"))
    ho, wo = layer.output_size(shape[2], shape[3])
    grad_out = torch.randn(shape[0], layer.out_channels, ho, wo, generator=gen, dtype=dtype, device=device)

    def make(name: str) -> Callable[[], Any]:
        # nn.Conv2d of the same geometry is the report's yardstick
        run = _static_conv if name == STATIC_REFERENCE else PATH_REGISTRY[name].run
        if grad:
            return lambda: torch.autograd.grad(run(layer, x, weight, factors), leaves, grad_out, allow_unused=True)

        def infer() -> None:
            with torch.no_grad():
                run(layer, x, weight, factors)

        return infer

    return {name: make(name) for name in [*names, STATIC_REFERENCE]}


#: every path computes at least the static conv's arithmetic (the conv with a rewritten weight, or R of them): a
#: winner timed below this fraction of the static conv measured in the same rounds says the rounds were hit unevenly
#: by other processes (seen under load: a path at "0.05x static", the static conv timed at 20 ms instead of ~0.05)
PLAUSIBLE_FRACTION_OF_STATIC = 1 / 3


def plausible_timing(times_ms: Mapping[str, float], winner: str) -> bool:
    """Whether a tuning measurement can be true: its winner is not far faster than the static conv it contains."""
    static = times_ms.get(STATIC_REFERENCE)
    return static is None or times_ms[winner] >= PLAUSIBLE_FRACTION_OF_STATIC * static


@torch._dynamo.assume_constant_result
def resolve_path(token: int, path: str, fields: Tuple[Any, ...]) -> str:
    """Path for one forward of layer ``token`` with the key ``fields`` (:func:`tuning_key`); under
    torch.compile it runs once, at trace time.

    Records the choice in the layer's path log (:func:`logged_paths`, :func:`.report.path_report`).
    """
    key = TuningKey._make(fields)
    layer: Optional[PEDConvLayer] = _LAYERS.get(token)
    times: Dict[str, float] = {}
    if path != "auto":
        chosen, source = path, "explicit"
    elif layer is None:  # pragma: no cover - a token outlives its layer only in odd pickling set-ups
        return "reference"
    else:
        names = candidate_paths(layer, key.shape, key.grad)
        fallback = heuristic_path(layer, key.shape, key.grad)
        device = torch.device(key.device) if key.device != "cuda" else layer.weight.device
        chosen, source = autotune.choose(key, lambda: timing_candidates(layer, key, names), device, fallback,
                                         references=(STATIC_REFERENCE,), valid=(*names, fallback),
                                         plausible=plausible_timing)
        cached = autotune.CACHE.get(key)
        times = dict(cached.times_ms) if cached is not None else {}
    if token in _PATH_LOGS:
        _PATH_LOGS[token][(key.shape, key.grad)] = {"path": chosen, "source": source, "times_ms": times}
    return chosen
