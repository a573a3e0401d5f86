"""Device-aware timing and run options shared by the benchmark and the profiler.

* :func:`time_calls` times back-to-back calls of a function: with CUDA events on a CUDA device (the
  GPU's own clock, after a synchronisation that drains earlier work, so that asynchronous launches are
  timed by what the GPU does), with ``time.perf_counter`` elsewhere.
* :func:`resolve_device` turns ``cpu | cuda | auto`` into a device, or a one-line error when CUDA is
  asked for and absent; :func:`autocast_context` / :data:`AMP_DTYPES` give ``--amp fp16|bf16``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, ContextManager, Dict, Optional

import torch

__all__ = ["AMP_DTYPES", "resolve_device", "synchronize", "time_calls", "autocast_context", "memory_format"]

#: ``--amp`` choices: autocast dtype (None: full precision)
AMP_DTYPES: Dict[str, Optional[torch.dtype]] = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (or ``cuda:N``) or ``auto`` (CUDA when available); ValueError when CUDA is absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} given but CUDA is not available (torch {torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, number: int = 1,
               event_factory: Optional[Callable[[], Any]] = None,
               sync: Optional[Callable[[torch.device], None]] = None) -> float:
    """Seconds per call of ``fn``, averaged over ``number`` back-to-back calls.

    CUDA: the device is synchronised, then two CUDA events (``event_factory``, default
    ``torch.cuda.Event(enable_timing=True)``) bracket the calls and ``elapsed_time`` gives the GPU
    time between them. Elsewhere: ``time.perf_counter`` around the calls. ``sync`` replaces
    :func:`synchronize` (tests).
    """
    if number < 1:
        raise ValueError(f"time_calls: number must be >= 1, got {number}")
    sync = sync or synchronize
    if device.type == "cuda":
        make = event_factory or (lambda: torch.cuda.Event(enable_timing=True))
        start, end = make(), make()
        sync(device)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number
    sync(device)
    begin = time.perf_counter()
    for _ in range(number):
        fn()
    sync(device)
    return (time.perf_counter() - begin) / number


def autocast_context(device: torch.device, amp: str) -> ContextManager[Any]:
    """``torch.autocast`` for ``--amp fp16|bf16`` on ``device``; a null context for ``none``."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"--amp {amp!r}: expected one of {', '.join(AMP_DTYPES)}")
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format
