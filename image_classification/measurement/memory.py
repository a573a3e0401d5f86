"""Memory of a training step, the one home of the meters the profiler and the per-layer benchmark use: the tensors
saved for backward (distinct storages, on any device), the peak CUDA allocation above a baseline, and the training
memory of a network (parameters, gradients, SGD momentum and saved tensors)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from image_classification.timing import autocast_context, synchronize

__all__ = ["cuda_peak_bytes", "saved_tensor_storages", "training_memory"]


@contextlib.contextmanager
def saved_tensor_storages(exclude: Iterable[int] = ()) -> Iterator[Dict[int, int]]:
    """Inside the block, every tensor autograd saves for backward is recorded as ``storage data_ptr -> bytes``
    (each storage once, however many views of it are saved); storages whose data pointer is in ``exclude`` (e.g.
    the parameters, which live anyway) are left out."""
    excluded = set(exclude)
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without a storage (e.g. a functional wrapper)
            return t
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak CUDA memory allocated while ``fn()`` runs, above what was allocated before it."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return float(torch.cuda.max_memory_allocated(device) - base)


def training_memory(model: nn.Module, batch: torch.Tensor, target: torch.Tensor, amp: str = "none") -> int:
    """Bytes of parameters + gradients + SGD momentum + tensors saved for backward (storage-deduplicated)."""
    model.train()
    with saved_tensor_storages() as seen, autocast_context(batch.device, amp):
        out = model(batch)
        loss = F.cross_entropy(out, target)
    loss.backward()
    model.zero_grad(set_to_none=True)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return sum(seen.values()) + 3 * param_bytes
