"""What the PEDConv kernels share: the geometry tuple, the per-thread scratch buffer for temporaries (why it
exists: :mod:`image_classification.dynamic.pedconv.kernels`), small tensor helpers, the autocast dtype and the
saved-tensor accounting of the memory tests."""

from __future__ import annotations

import threading
from typing import Optional, Sequence, Tuple, overload

import torch
from torch import Tensor

from ...functional import conv_output_size

__all__ = [
    "Geometry",
    "ENGINES",
    "SCRATCH_MAX_NUMEL",
    "scratch_pays",
    "scratch",
    "times_inplace",
    "as_matrix",
    "mul_temporary",
    "conv_backward",
    "expand_phi",
    "reduce_phi",
    "scale_grad",
    "mul_to_contiguous",
    "conv_out_hw",
    "is_pointwise",
    "compute_dtype",
    "cast",
    "needs_grad",
    "saved_tensor_bytes",
]

#: (stride, padding, dilation, groups) with 2-tuples of ints, as nn.Conv2d holds them.
Geometry = Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int], int]
ENGINES = ("dense", "grouped", "loop", "gemm")


_SCRATCH = threading.local()
#: largest temporary (elements) the scratch buffer holds: 16 MiB of float32, above every ResNet/MobileNet weight
#: (ResNet-50's largest is 2.4M); larger ones (per-sample kernels of big batches) are allocated as usual, so a
#: validation pass never leaves a batch-sized buffer behind
SCRATCH_MAX_NUMEL = 1 << 22


def scratch_pays(like: Tensor) -> bool:
    """Whether temporaries go to the scratch buffer: eager CPU code (not compiled, traced or exported)."""
    return like.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.jit.is_tracing()


def scratch(shape: Sequence[int], like: Tensor) -> Tensor:
    """An uninitialised contiguous tensor of ``shape`` (``like``'s dtype) for a temporary that is consumed before
    the next call: a view of a per-thread CPU buffer reused by every call, up to :data:`SCRATCH_MAX_NUMEL`
    elements (eager CPU code only: see :func:`scratch_pays`). The buffer and its views are made outside
    inference mode, so ``out=`` writes into them work in both inference mode and ``no_grad``."""
    shape = tuple(shape)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    views = buffers.get((like.dtype, shape))  # the view of every shape is made once per buffer
    if views is not None:
        return views
    numel = 1
    for size in shape:
        numel *= size
    if numel > SCRATCH_MAX_NUMEL:
        return like.new_empty(shape)
    flat = buffers.get(like.dtype)
    if flat is None or flat.numel() < numel:
        with torch.inference_mode(False):
            flat = torch.empty(numel, dtype=like.dtype)
        for key in [key for key in buffers if isinstance(key, tuple) and key[0] == like.dtype]:
            del buffers[key]  # views of the old buffer
        buffers[like.dtype] = flat
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    with torch.inference_mode(False):  # a view usable inside and outside inference mode
        view = buffers[(like.dtype, shape)] = flat.as_strided(shape, tuple(reversed(strides)))
    return view


def times_inplace(y: Tensor, scale: Tensor) -> Tensor:
    """``y * scale`` into ``y``, a fresh output nothing else holds; out of place when compiled, where inductor fuses
    the product anyway and torch 2.11's inductor corrupts the heap on the in-place form inside an autograd.Function
    (the ``fold`` path's training forward)."""
    return y * scale if torch.compiler.is_compiling() else y.mul_(scale)


def as_matrix(t: Tensor, shape: Tuple[int, int]) -> Tensor:
    """``t.reshape(shape)``; for a scratch temporary, the buffer's cached view of that shape (no dispatch)."""
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is not None and buffers.get((t.dtype, tuple(t.shape))) is t:
        return scratch(shape, t)
    return t.reshape(shape)  # a view, or a copy of a channels_last weight


def mul_temporary(a: Tensor, b: Tensor, shape: Sequence[int]) -> Tensor:
    """``a * b`` (broadcast to ``shape``, ``a``'s dtype) as a temporary: in the scratch buffer where it pays."""
    if not scratch_pays(a):
        return a * b
    return torch.mul(a, b, out=scratch(shape, a))


def conv_backward(grad: Tensor, inp: Tensor, weight: Tensor, geometry: Geometry, groups: int,
                   need_input: bool, need_weight: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    stride, padding, dilation, _ = geometry
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, inp, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
        [need_input, need_weight, False],
    )
    return grad_input, grad_weight


def expand_phi(phi: Tensor, groups: int) -> Tensor:
    """B x C_in/g -> B x C_in x 1 x 1 (phi scales the in-channels of every group alike)."""
    full = phi.repeat(1, groups) if groups > 1 else phi
    return full.view(full.shape[0], full.shape[1], 1, 1)


def reduce_phi(grad_full: Tensor, groups: int) -> Tensor:
    """B x C_in gradient of the repeated phi -> B x C_in/g."""
    batch = grad_full.shape[0]
    return grad_full.view(batch, groups, -1).sum(1) if groups > 1 else grad_full


def scale_grad(grad_out: Tensor, out: Tensor, scale: Tensor) -> Tensor:
    """d/d scale of ``out = scale[:, :, None, None] * z`` as ``sum_hw grad_out * out / scale`` (B x C_out)."""
    dot = (grad_out * out).sum(dim=(2, 3))
    return torch.where(scale != 0, dot / torch.where(scale != 0, scale, torch.ones_like(scale)), torch.zeros_like(dot))


def mul_to_contiguous(a: Tensor, b: Tensor, shape: Tuple[int, ...]) -> Tensor:
    """``(a * b)`` as a new contiguous tensor viewed to ``shape``, in one pass.

    Eager: ``torch.mul(..., out=)`` writes the (permuted) product straight into a contiguous buffer.
    Compiled: ``out=`` is functionalised with the product's own strides, so ``contiguous()`` is used and
    inductor fuses the two into one kernel.
    """
    if torch.compiler.is_compiling():
        return (a * b).contiguous().view(shape)
    out = torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.result_type(a, b), device=a.device)
    torch.mul(a, b, out=out)
    return out.view(shape)


def conv_out_hw(height: int, width: int, kernel: Tuple[int, int], geometry: Geometry) -> Tuple[int, int]:
    stride, padding, dilation, _ = geometry
    return conv_output_size((height, width), kernel, stride, padding, dilation)



def is_pointwise(x: Tensor, weight: Tensor, geometry: Geometry) -> bool:
    """1x1 kernel, stride 1, no padding and NCHW-contiguous input: per-sample weights as a batched matmul."""
    stride, padding, _, _ = geometry
    return weight.shape[2:] == (1, 1) and stride == (1, 1) and padding == (0, 0) and x.is_contiguous()


def compute_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype for ``x``'s device when autocast is on (and x is floating), else None."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


@overload
def cast(t: Tensor, dtype: Optional[torch.dtype]) -> Tensor: ...
@overload
def cast(t: None, dtype: Optional[torch.dtype]) -> None: ...
@overload
def cast(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]: ...
def cast(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """``t`` in ``dtype`` (None stays None; no ``dtype`` or the same one: ``t`` itself)."""
    return t if (t is None or dtype is None or t.dtype == dtype) else t.to(dtype)


def needs_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether the autograd Function is needed.

    A jit trace (TorchScript or the TorchScript-based ONNX exporter) never takes it: a Python autograd
    Function becomes an opaque PythonOp that neither ``torch.jit.save`` nor ONNX can serialize, while the
    plain forward is made of standard ops (and autograd still differentiates it, without the lean memory).
    """
    if torch.jit.is_tracing():
        return False
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def saved_tensor_bytes(fn, *args, exclude: Tuple[Tensor, ...] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while running ``fn(*args)``.

    Storages of ``exclude`` (e.g. parameters, which live anyway) are not counted.
    """
    seen = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())
