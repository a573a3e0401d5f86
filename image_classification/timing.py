"""The one timing harness (the autotuner, the benchmark, the profiler and the Triton check use it) and the run
options they share.

* :func:`time_calls` times back-to-back calls of a function: with CUDA events on a CUDA device (the
  GPU's own clock, after a synchronisation that drains earlier work, so that asynchronous launches are
  timed by what the GPU does), with ``time.perf_counter`` elsewhere.
* :func:`interleaved_samples` takes samples of several functions in interleaved rounds (load from other
  processes hits all of them alike) after a warm-up; :func:`calls_for_duration` sizes a sample to a target time.
  Callers reduce the samples: the minimum where other processes only ever add time (benchmark, autotuner), the
  median where the inputs vary (the profiler's images).
* :func:`resolve_device` turns ``cpu | cuda | auto`` into a device, or a one-line error when CUDA is
  asked for and absent; :func:`autocast_context` / :data:`AMP_DTYPES` give ``--amp fp16|bf16``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Union

import torch

__all__ = ["AMP_DTYPES", "autocast_context", "calls_for_duration", "interleaved_samples", "memory_format",
           "resolve_device", "synchronize", "time_calls"]

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


def interleaved_samples(fns: Mapping[str, Callable[[], Any]], device: torch.device, repeats: int, *,
                        warmup: int = 0, number: Union[int, Mapping[str, int]] = 1, alternate: bool = False,
                        first_round: int = 0, before_call: Optional[Callable[[], None]] = None,
                        ) -> Dict[str, List[float]]:
    """Seconds per call of each of ``fns``: ``repeats`` samples each, taken in rounds that time every function once.

    ``warmup`` calls of each function come first (compilation, autotuning, caches). A sample is :func:`time_calls`
    over ``number`` back-to-back calls (one count, or one per function: :func:`calls_for_duration`). With
    ``alternate`` every other round (counted from ``first_round``) takes the functions in reverse order, so none
    always runs right after the same other one. ``before_call`` runs before every call and sample (a deadline
    check may raise there).
    """
    if repeats < 0 or warmup < 0:
        raise ValueError(f"interleaved_samples: repeats and warmup must be >= 0, got {repeats}, {warmup}")
    check = before_call or (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            check()
            fn()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for index in range(repeats):
        names = list(fns)
        if alternate and (first_round + index) % 2:
            names.reverse()
        for name in names:
            check()
            calls = number[name] if isinstance(number, Mapping) else number
            samples[name].append(time_calls(fns[name], device, calls))
    return samples


def calls_for_duration(fn: Callable[[], Any], device: torch.device, target_s: float, cap: int = 100,
                       trials: int = 1) -> int:
    """Calls per sample so that one sample of ``fn`` lasts about ``target_s``: from the fastest of ``trials``
    single calls, at least 1 and at most ``cap``."""
    once = min(time_calls(fn, device) for _ in range(max(1, trials)))
    return max(1, min(cap, int(target_s / max(once, 1e-6))))


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
