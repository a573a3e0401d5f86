"""PEDConv's execution paths: every one computes Eq. 2 (or Appendix E) exactly; they differ in speed and memory.

A path is one :class:`PathSpec` in :data:`PATH_REGISTRY`:

* ``run(layer, x, weight, factors)`` computes the layer's output without bias (``factors``: gamma, phi, psi,
  each B x R x dim after the sigmoid, None for a left-out component); it reads only the layer's geometry
  and options, so the autotuner can run it on random tensors of the same shapes;
* ``applicable(layer, shape, grad)`` says whether ``path=auto`` offers it to the autotuner for an input
  of ``shape`` (``grad``: a backward follows). An explicitly chosen path always runs (``path=NAME``);
* ``lean``: the path saves only the layer input, its output and the small factors for backward, so
  the autotuner may choose it when a backward follows (non-lean paths compete in inference only).

Adding a path is one entry, e.g. a CUDA kernel for the multiplicative rank-1 conv::

    register_path(PathSpec(
        "triton_igemm", run=_run_triton, lean=True,
        applicable=lambda layer, shape, grad: layer.weight.is_cuda and layer.rank == 1
                                               and layer.reparam == "multiplicative",
        help="Triton implicit GEMM of gamma * conv(phi * x, W * psi)"))

after which ``pedconv:path=triton_igemm`` is a valid spec and ``path=auto`` times it where applicable.
Spec validation reads :func:`path_names` at each check, so a path registered at any time is valid from then on.

Paths (see :mod:`.kernels` for the lean Functions):

* ``reference``   - per sample, ``F.conv2d`` with the effective weight (the plain formula; never tuned).
* ``materialize`` - the per-sample effective weights, one grouped conv, or one batched matmul for 1x1
  kernels (lean: rebuilt in backward).
* ``fold``        - ``gamma_b * conv(x_b, W * (phi_b (x) psi_b))`` (Eq. 3): gamma on the output, only the
  C_out-free part of the CP tensor in the per-sample kernel (one grouped conv); for 1x1 kernels or
  without psi ``gamma * psi * conv(phi * x, W)``, a dense conv plus channel scalings. Lean.
* ``sample_loop`` - ``fold``'s per-sample kernel, but one dense conv per sample: dense-conv speed at any
  batch, one sample's kernel (and kernel gradient) at a time. Lean.
* ``patch_gemm``  - the single-GEMM patch path: the psi(x)phi-scaled k*k patches of all samples as one
  (C_in/g*k*k) x (B*H_out*W_out) matrix, one matmul with W_base forward and one for grad-W. Lean.
* ``factored``    - psi as k*k shifted 1x1 convolutions weighted per sample (autograd; inference only).
* ``unfold``      - per-sample patch matmuls ``W_base @ patches_b`` (autograd; inference only).
* ``triton``      - the fused Triton implicit GEMM (:mod:`.triton`): each loaded input element
  scaled by ``phi * psi`` on the fly, ``gamma`` in the epilogue; static-conv FLOPs and traffic. Lean.
  ``auto`` offers it on CUDA only (rank 1, multiplicative, groups 1, fp32/fp16/bf16, not under
  deterministic algorithms in training); ``path=triton`` elsewhere is a one-line error naming why,
  except in Triton's interpreter (``TRITON_INTERPRET=1``), which runs it on the CPU (the tests).

Rank R > 1 sums R rank-1 terms (``fold``, ``sample_loop``, ``patch_gemm``, ``factored``, ``unfold``) or folds all
of them into the per-sample weight (``materialize``, ``reference``). The additive form (Appendix E) runs
``conv(x, W_base)`` plus the low-rank term on every path but ``reference``/``materialize``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...named_registry import NamedRegistry
from . import triton as triton_ops
from .common import PEDConvLayer
from .kernels import materialized_conv, scaled_conv

__all__ = [
    "Factors",
    "PathSpec",
    "PATH_REGISTRY",
    "GROUPED_MAX_WEIGHT_RATIO",
    "BATCH1_FOLD_MAX_RATIO",
    "SAMPLE_LOOP_MIN_MACS",
    "MATERIALIZE_MAX_WEIGHT_RATIO",
    "register_path",
    "path_names",
    "candidate_paths",
    "heuristic_path",
    "effective_weight",
    "triton_applicable",
    "triton_unsupported_reason",
    "activation_scaled",
    "run_additive",
    "sum_terms",
]

Shape = Tuple[int, ...]


class Factors(NamedTuple):
    """Post-sigmoid CP components, each B x R x dim (None: left out, i.e. fixed to 1)."""

    gamma: Optional[Tensor]
    phi: Optional[Tensor]
    psi: Optional[Tensor]

    def full(self, layer: PEDConvLayer, like: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(gamma, phi, psi) with ones for left-out components."""
        batch = like.shape[0]
        dims = _dims(layer)
        out = []
        for name, value in (("gamma", self.gamma), ("phi", self.phi), ("psi", self.psi)):
            out.append(value if value is not None else like.new_ones(batch, layer.rank, dims[name]))
        return out[0], out[1], out[2]


@dataclass(frozen=True)
class PathSpec:
    """One exact execution path of PEDConv (see the module docstring)."""

    name: str
    run: Callable[[PEDConvLayer, Tensor, Tensor, Factors], Tensor]
    help: str = ""
    applicable: Callable[[PEDConvLayer, Shape, bool], bool] = lambda layer, shape, grad: True
    lean: bool = False
    tune: bool = True


PATH_REGISTRY: NamedRegistry[PathSpec] = NamedRegistry("PEDConv path")

#: ``fold`` at batch 1 (the heuristic's choice): while the folded weight is at most this many times the patch matrix
#: (ResNet-18 at 224 px: layer3's 256 channels at 14x14 fold, layer4's 512 at 7x7 take the patch GEMM)
BATCH1_FOLD_MAX_RATIO = 2
#: ``fold`` with k x k kernels: the grouped per-sample kernel B x C_out x C_in/g x kk is offered to the
#: autotuner (and chosen by the heuristic) while ``C_out * kk <= ratio * H_out * W_out``, i.e. while the
#: per-sample kernel of one sample stays within ``ratio`` output maps of one channel; beyond it (e.g.
#: ResNet-18's 512-channel 7x7 stage, 64 channels at 7x7) the grouped conv costs 5-25x nn.Conv2d.
GROUPED_MAX_WEIGHT_RATIO = 4
#: per-sample multiply-adds from which ``sample_loop`` is the heuristic's choice at batch > 1 (e.g. 128
#: channels at 28x28: 116M; CIFAR widths, 16-64 channels: 1.8M, where per-sample convs are too small)
SAMPLE_LOOP_MIN_MACS = 16_000_000
#: ``materialize`` is offered while the per-sample weights are at most this many times the layer's
#: input plus output (``never materialize a per-sample weight where a cheaper equivalent exists``).
MATERIALIZE_MAX_WEIGHT_RATIO = 1.0


def register_path(spec: PathSpec) -> PathSpec:
    """Add (or replace) a path; ``pedconv:path=NAME`` and ``path=auto`` see it from then on."""
    if not spec.name or spec.name == "auto":
        raise ValueError(f"register_path: invalid path name {spec.name!r}")
    return PATH_REGISTRY.register(spec.name, spec, replace=True)


def path_names() -> Tuple[str, ...]:
    """``auto`` followed by every registered path."""
    return ("auto", *PATH_REGISTRY)


# ------------------------------------------------------------------------------------------- helpers
def _dims(layer: PEDConvLayer) -> Dict[str, int]:
    return {"gamma": layer.out_channels, "phi": layer.in_channels // layer.groups,
            "psi": layer.kernel_size[0] * layer.kernel_size[1]}


def _geometry(layer: PEDConvLayer):
    return (tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation), layer.groups)


def _rank_terms(layer: PEDConvLayer, f: Factors
                ) -> Iterator[Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]]:
    """Rank-1 terms (gamma_r, phi_r, psi_r), each B x dim or None; one term when a single component is present."""
    gamma, phi, psi = f.gamma, f.phi, f.psi
    rank = layer.rank
    if len(layer.components) == 1 and rank > 1:
        # a single present component: sum_r W * c_r = W * (sum_r c_r), one term
        gamma, phi, psi = (None if c is None else c.sum(dim=1, keepdim=True) for c in (gamma, phi, psi))
        rank = 1
    if rank == 1:
        yield tuple(None if c is None else c.view(c.shape[0], c.shape[2]) for c in (gamma, phi, psi))  # type: ignore[misc]  # a 3-tuple; mypy sees a variable-length tuple
        return
    for r in range(rank):
        yield tuple(None if c is None else c.select(1, r) for c in (gamma, phi, psi))  # type: ignore[misc]  # a 3-tuple; mypy sees a variable-length tuple


def sum_terms(
    layer: PEDConvLayer, f: Factors, term: Callable[[Optional[Tensor], Optional[Tensor], Optional[Tensor]], Tensor]
) -> Tensor:
    if layer.rank == 1:  # the common case, without the generator machinery
        return term(*(None if c is None else c.view(c.shape[0], c.shape[2]) for c in f))
    out: Optional[Tensor] = None
    for gamma, phi, psi in _rank_terms(layer, f):
        y = term(gamma, phi, psi)
        out = y if out is None else out + y
    assert out is not None
    return out


def effective_weight(layer: PEDConvLayer, weight: Tensor, gamma: Tensor, phi: Tensor, psi: Tensor) -> Tensor:
    """Per-sample weight B x C_out x C_in/g x kh x kw: ``W * CP`` (Eq. 2) or ``W + CP`` (Appendix E)."""
    cp = torch.einsum("brt,brs,brk->btsk", gamma, phi, psi).reshape(gamma.shape[0], *weight.shape)
    return weight * cp if layer.reparam == "multiplicative" else weight + cp


def _is_1x1(layer: PEDConvLayer) -> bool:
    return layer.kernel_size[0] * layer.kernel_size[1] == 1


def _engine_for_fold(layer: PEDConvLayer, psi: Optional[Tensor]) -> str:
    return "dense" if (psi is None or _is_1x1(layer)) else "grouped"


# -------------------------------------------------------------------------------------- additive
def _lowrank_term(layer: PEDConvLayer, x: Tensor, gamma: Tensor, phi: Tensor, psi: Tensor) -> Tensor:
    """``conv(x, sum_r gamma_r (x) phi_r (x) psi_r)`` (Appendix E) via channel sums and a depthwise psi conv."""
    batch, _, height, width = x.shape
    groups, rank = layer.groups, layer.rank
    kh, kw = layer.kernel_size
    cin_g, cout_g = layer.in_channels // groups, layer.out_channels // groups
    z = torch.einsum("bgshw,brs->brghw", x.reshape(batch, groups, cin_g, height, width), phi)
    kernel = psi.reshape(batch * rank, 1, 1, kh, kw).expand(batch * rank, groups, 1, kh, kw)
    y = F.conv2d(
        z.reshape(1, batch * rank * groups, height, width), kernel.reshape(-1, 1, kh, kw), None,
        groups=batch * rank * groups, **layer.conv_kwargs(),
    )
    y = y.view(batch, rank, groups, y.shape[-2], y.shape[-1])
    out = torch.einsum("brghw,brgo->bgohw", y, gamma.view(batch, rank, groups, cout_g))
    return out.reshape(batch, layer.out_channels, y.shape[-2], y.shape[-1])


def run_additive(layer: PEDConvLayer, x: Tensor, weight: Tensor, f: Factors) -> Tensor:
    out = F.conv2d(x, weight, None, groups=layer.groups, **layer.conv_kwargs())
    return out + _lowrank_term(layer, x, *f.full(layer, x))


# ------------------------------------------------------------------------------------------- paths
def _run_reference(layer: PEDConvLayer, x: Tensor, weight: Tensor, f: Factors) -> Tensor:
    weights = effective_weight(layer, weight, *f.full(layer, x))
    outs = [F.conv2d(x[b : b + 1], weights[b], None, groups=layer.groups, **layer.conv_kwargs())
            for b in range(x.shape[0])]
    return torch.cat(outs, dim=0)


def _run_materialize(layer: PEDConvLayer, x: Tensor, weight: Tensor, f: Factors) -> Tensor:
    gamma, phi, psi = f.full(layer, x)
    return materialized_conv(x, weight, gamma, phi, psi, _geometry(layer), layer.reparam == "additive")


def _run_fold(layer: PEDConvLayer, x: Tensor, weight: Tensor, f: Factors) -> Tensor:
    if layer.reparam == "additive":
        return run_additive(layer, x, weight, f)
    geometry = _geometry(layer)
    return sum_terms(layer, f, lambda g, p, s: scaled_conv(x, weight, g, p, s, geometry, _engine_for_fold(layer, s)))


def _run_sample_loop(layer: PEDConvLayer, x: Tensor, weight: Tensor, f: Factors) -> Tensor:
    if layer.reparam == "additive":
        return run_additive(layer, x, weight, f)
    geometry = _geometry(layer)
    return sum_terms(layer, f, lambda g, p, s: scaled_conv(x, weight, g, p, s, geometry, "loop"))


def _run_patch_gemm(layer: PEDConvLayer, x: Tensor, weight: Tensor, f: Factors) -> Tensor:
    if layer.reparam == "additive":
        return run_additive(layer, x, weight, f)
    geometry = _geometry(layer)
    return sum_terms(layer, f, lambda g, p, s: scaled_conv(x, weight, g, p, s, geometry, "gemm"))


def _psi_shift_conv(layer: PEDConvLayer, u: Tensor, weight: Tensor, psi: Tensor) -> Tensor:
    """k*k shifted 1x1 convolutions, each weighted by its psi value per sample."""
    batch = u.shape[0]
    kh, kw = layer.kernel_size
    ho, wo = layer.output_size(u.shape[2], u.shape[3])
    (ph, pw), (sh, sw), (dh, dw) = layer.padding, layer.stride, layer.dilation
    padded = F.pad(u, (pw, pw, ph, ph)) if ph or pw else u
    out: Optional[Tensor] = None
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
            y = F.conv2d(window, weight[:, :, i : i + 1, j : j + 1], None, groups=layer.groups)
            y = y * psi[:, i * kw + j].view(batch, 1, 1, 1)
            out = y if out is None else out + y
    assert out is not None
    return out


def _psi_unfold_conv(layer: PEDConvLayer, u: Tensor, weight: Tensor, psi: Tensor) -> Tensor:
    """The k*k patches scaled by psi per sample, then a per-sample matmul with W_base."""
    batch = u.shape[0]
    kh, kw = layer.kernel_size
    ho, wo = layer.output_size(u.shape[2], u.shape[3])
    groups = layer.groups
    patches = F.unfold(u, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    patches = patches.view(batch, groups, -1, kh * kw, ho * wo) * psi.view(batch, 1, 1, kh * kw, 1)
    w = weight.reshape(groups, layer.out_channels // groups, -1)
    y = torch.matmul(w, patches.view(batch, groups, w.shape[-1], ho * wo))
    return y.view(batch, layer.out_channels, ho, wo)


def activation_scaled(psi_conv: Callable[[PEDConvLayer, Tensor, Tensor, Tensor], Tensor]):
    """A plain-autograd path: gamma and phi on activations, ``psi_conv`` for the per-sample psi."""

    def run(layer: PEDConvLayer, x: Tensor, weight: Tensor, f: Factors) -> Tensor:
        if layer.reparam == "additive":
            return run_additive(layer, x, weight, f)
        batch = x.shape[0]

        def term(gamma: Optional[Tensor], phi: Optional[Tensor], psi: Optional[Tensor]) -> Tensor:
            u = x * phi.repeat(1, layer.groups).view(batch, -1, 1, 1) if phi is not None else x
            if psi is None:
                y = F.conv2d(u, weight, None, groups=layer.groups, **layer.conv_kwargs())
            elif _is_1x1(layer):
                y = F.conv2d(u, weight, None, groups=layer.groups, **layer.conv_kwargs()) * psi.view(batch, 1, 1, 1)
            else:
                y = psi_conv(layer, u, weight, psi)
            return y * gamma.view(batch, -1, 1, 1) if gamma is not None else y

        return sum_terms(layer, f, term)

    return run


# ------------------------------------------------------------------------------------ applicability
def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _activation_numel(layer: PEDConvLayer, shape: Shape) -> int:
    ho, wo = layer.output_size(shape[2], shape[3])
    return _numel(shape) + shape[0] * layer.out_channels * ho * wo


def _per_sample_weight_numel(layer: PEDConvLayer, batch: int) -> int:
    return batch * layer.weight.numel()


def _materialize_applicable(layer: PEDConvLayer, shape: Shape, grad: bool) -> bool:
    return (shape[0] == 1 or _per_sample_weight_numel(layer, shape[0])
            <= MATERIALIZE_MAX_WEIGHT_RATIO * _activation_numel(layer, shape))


def _grouped_fits(layer: PEDConvLayer, shape: Shape) -> bool:
    """Whether the per-sample kernel W * psi_b is cheap next to the convolution's activations.

    Batch 1: ``W * (phi (x) psi)`` (C_out x C_in/g x kk) is at most ``BATCH1_FOLD_MAX_RATIO`` times the
    patch matrix the GEMM path would scale instead (C_in/g x kk x H_out*W_out), i.e. ``C_out <= 2 H_out
    W_out`` (a dense conv with the folded weight beats im2col + GEMM while the weight pass is that small).
    Batch > 1: ``C_out * kk <= GROUPED_MAX_WEIGHT_RATIO * H_out * W_out``.
    """
    kh, kw = layer.kernel_size
    ho, wo = layer.output_size(shape[2], shape[3])
    if shape[0] == 1:
        return layer.out_channels <= BATCH1_FOLD_MAX_RATIO * ho * wo
    return layer.out_channels * kh * kw <= GROUPED_MAX_WEIGHT_RATIO * ho * wo


def _fold_applicable(layer: PEDConvLayer, shape: Shape, grad: bool) -> bool:
    if layer.reparam == "additive":
        return True  # the low-rank path of the additive form (shared by the activation-scaled paths)
    return shape[0] == 1 or _is_1x1(layer) or "psi" not in layer.components or _grouped_fits(layer, shape)


def _multiplicative(layer: PEDConvLayer, shape: Shape, grad: bool) -> bool:
    return layer.reparam == "multiplicative"


def _sample_loop_applicable(layer: PEDConvLayer, shape: Shape, grad: bool) -> bool:
    # batch 1, 1x1 kernels or no psi: the same computation as fold
    return (shape[0] > 1 and layer.reparam == "multiplicative" and not _is_1x1(layer)
            and "psi" in layer.components)


def _inference_only(layer: PEDConvLayer, shape: Shape, grad: bool) -> bool:
    return not grad and layer.reparam == "multiplicative" and not _is_1x1(layer) and "psi" in layer.components


register_path(PathSpec("reference", _run_reference, "per-sample F.conv2d with the effective weight (the formula)",
                       tune=False))
register_path(PathSpec("materialize", _run_materialize, "per-sample effective weights, one grouped conv",
                       applicable=_materialize_applicable, lean=True))
register_path(PathSpec("fold", _run_fold, "gamma * conv(x, W * (phi (x) psi)_b): grouped per-sample kernel",
                       applicable=_fold_applicable, lean=True))
register_path(PathSpec("sample_loop", _run_sample_loop,
                       "one dense conv per sample with W * (phi (x) psi)_b, gamma on the output",
                       applicable=_sample_loop_applicable, lean=True))
register_path(PathSpec("factored", activation_scaled(_psi_shift_conv),
                       "psi as k*k shifted 1x1 convs weighted per sample", applicable=_inference_only))
register_path(PathSpec("unfold", activation_scaled(_psi_unfold_conv), "psi-scaled patches, per-sample matmuls",
                       applicable=_inference_only))
register_path(PathSpec("patch_gemm", _run_patch_gemm,
                       "phi(x)psi-scaled patches of all samples as one matrix: one GEMM forward, one for grad-W",
                       applicable=_multiplicative, lean=True))


# ------------------------------------------------------------------------------------------- triton
# the fused Triton implicit GEMM (CUDA; rank 1, multiplicative, groups 1; kernels and launchers: .triton)
def triton_unsupported_reason(layer: PEDConvLayer, dtype: torch.dtype, device: torch.device,
                              grad: bool) -> Optional[str]:
    """Why the ``triton`` path cannot run ``layer`` on an input of ``dtype`` on ``device`` (None: it can).

    ``dtype`` is the compute dtype (the autocast dtype under autocast). Device: compiled kernels need
    CUDA; Triton's interpreter (``TRITON_INTERPRET=1``) runs them anywhere. A backward under
    ``torch.use_deterministic_algorithms(True)`` (``main.py --deterministic``) is refused: its float32
    atomics add in an unspecified order.
    """
    if layer.reparam != "multiplicative":
        return "it computes the multiplicative form only (this layer has reparam=additive)"
    if layer.groups != 1:
        return f"it supports groups = 1 only (this layer has groups = {layer.groups})"
    if dtype not in triton_ops.SUPPORTED_DTYPES:
        return f"it supports float32/float16/bfloat16 only (the input computes in {dtype})"
    if (grad and torch.are_deterministic_algorithms_enabled()
            and not torch.is_deterministic_algorithms_warn_only_enabled()):
        return ("its backward adds float32 partial sums with atomics, which torch.use_deterministic_algorithms(True) "
                "(--deterministic) forbids")
    if torch.compiler.is_compiling():
        return None  # traced: the operator checks the device when it runs
    return triton_ops.unavailable_reason(device)


def _triton_compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def triton_applicable(layer: PEDConvLayer, shape: Tuple[int, ...], grad: bool) -> bool:
    """Whether ``path=auto`` times the ``triton`` path: compiled kernels on a CUDA device (never the
    interpreter), a single rank-1 term, and everything :func:`triton_unsupported_reason` accepts."""
    weight = layer.weight
    if not weight.is_cuda or triton_ops.interpreting():
        return False
    single_term = layer.rank == 1 or len(layer.components) == 1
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else weight.dtype
    return single_term and triton_unsupported_reason(layer, dtype, weight.device, grad) is None


def _run_triton(layer: PEDConvLayer, x: Tensor, weight: Tensor, factors: Factors) -> Tensor:
    """``PathSpec.run`` of the ``triton`` path: ``sum_r gamma_r * conv(phi_r * x, W_base * psi_r)`` with the
    fused kernel, one launch per rank-1 term (factors B x R x dim, None for a left-out component)."""
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    reason = triton_unsupported_reason(layer, _triton_compute_dtype(x), x.device, grad)
    if reason is not None:
        raise ValueError(f"pedconv: path=triton cannot run this layer: {reason}")
    gamma, phi, psi = factors
    rank = layer.rank
    if len(layer.components) == 1 and rank > 1:  # a single component: sum_r W * c_r = W * sum_r c_r
        gamma, phi, psi = (None if c is None else c.sum(dim=1, keepdim=True) for c in (gamma, phi, psi))
        rank = 1
    autotune = triton_ops.tile_mode() != "heuristic"
    out: Optional[Tensor] = None
    for r in range(rank):
        g, p, s = (None if c is None else c.select(1, r) for c in (gamma, phi, psi))
        y = triton_ops.pedconv_conv2d_triton(x, weight, g, p, s, stride=tuple(layer.stride),
                                             padding=tuple(layer.padding), dilation=tuple(layer.dilation),
                                             autotune=autotune)
        out = y if out is None else out + y
    assert out is not None
    return out


register_path(PathSpec("triton", _run_triton,
                       "fused Triton implicit GEMM gamma * conv(phi * x, W * psi), CUDA only (rank 1, groups 1)",
                       applicable=triton_applicable, lean=True))


def candidate_paths(layer: PEDConvLayer, shape: Shape, grad: bool) -> List[str]:
    """Paths ``auto`` times for this layer and input shape (lean ones only when a backward follows)."""
    return [name for name, spec in PATH_REGISTRY.items()
            if spec.tune and (spec.lean or not grad) and spec.applicable(layer, shape, grad)]


def heuristic_path(layer: PEDConvLayer, shape: Shape, grad: bool) -> str:
    """Deterministic choice when tuning is off (a shape rule from 2-core CPU timings; the paths: docs/performance.md).

    Additive: ``materialize`` at batch 1, else ``fold`` (the low-rank path). Depthwise-like layers
    (C_in/g == 1): ``materialize`` (the per-sample weight is tiny). 1x1 kernels or no psi:
    ``materialize`` (one batched matmul) while the per-sample weights are no larger than the
    activations, else ``fold`` (a dense conv plus channel scalings). k x k kernels at batch 1: ``fold``
    (a dense conv with ``W * (gamma (x) phi (x) psi)``) while ``C_out <= 2 H_out * W_out``, else ``patch_gemm``. At
    batch > 1: layers with at least ``SAMPLE_LOOP_MIN_MACS`` multiply-adds per sample run
    ``sample_loop`` (dense per-sample convs are efficient) on maps of 8x8 and more, ``patch_gemm`` on
    smaller ones; narrower layers ``fold`` while its grouped kernel fits, else ``patch_gemm``. Rank > 1
    with more than one component folds into ``materialize`` at batch 1.
    """
    batch = shape[0]
    single = layer.rank == 1 or len(layer.components) == 1
    if layer.reparam == "additive":
        return "materialize" if batch == 1 else "fold"
    if layer.in_channels // layer.groups == 1:
        return "materialize"
    if _is_1x1(layer) or "psi" not in layer.components:
        return "materialize" if _materialize_applicable(layer, shape, grad) else "fold"
    if batch == 1:
        if not single:
            return "materialize"
        return "fold" if _grouped_fits(layer, shape) else "patch_gemm"
    ho, wo = layer.output_size(shape[2], shape[3])
    if layer.weight.numel() * ho * wo >= SAMPLE_LOOP_MIN_MACS:
        return "sample_loop" if ho * wo >= 64 else "patch_gemm"
    return "fold" if _grouped_fits(layer, shape) else "patch_gemm"
