"""Autotuning of exact execution paths, in the spirit of ``torch.backends.cudnn.benchmark``.

An operator with several exact ways to compute its output (PEDConv's ``path=auto``) asks :func:`choose`
for a key that describes everything the timing depends on (layer geometry, input shape, dtype, device
type, memory format, whether a backward follows) and gives a function that times its applicable paths.
On the first use of a key the paths are timed once and the fastest is kept in a process-wide cache
(:data:`CACHE`); later uses are a dictionary look-up. Keys contain no rank- or device-index-specific
part, so the DDP ranks of a job have the same keys and :func:`broadcast_cache` makes them agree on rank
0's choices (``main.py`` tunes every layer before the first epoch and broadcasts; it broadcasts again at
every epoch end for keys met later, e.g. a smaller last batch).

Tuning is on by default. ``PEDCONV_AUTOTUNE=0`` in the environment, :func:`set_autotune(False)
<set_autotune>` or ``main.py --no-autotune`` (also implied by ``--deterministic``) switch it off: every
operator then uses its deterministic shape heuristic, as the tests do. Cached choices stay in use either
way (all paths are exact, so a choice only changes speed and float rounding).

Timing (:func:`measure`): one warm-up call per candidate, then interleaved rounds (each round times
every candidate once) - at least 3, up to 12 while they take under 0.25 s - and each candidate's time
is its minimum (other processes only ever add time). After the first 3 rounds a candidate slower than
``_GIVE_UP`` times the best drops out. On CUDA the device is synchronised around each call.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = [
    "ENV_VAR",
    "CACHE",
    "generation",
    "TuneResult",
    "PathCache",
    "autotune_enabled",
    "set_autotune",
    "measure",
    "choose",
    "broadcast_cache",
    "prepare_model",
]

ENV_VAR = "PEDCONV_AUTOTUNE"
_GIVE_UP = 4.0
_override: Dict[str, Optional[bool]] = {"enabled": None}
_generation = [0]  # bumped on every change of the cache or the switch: callers memoise choices against it


def generation() -> int:
    """A counter that changes whenever a cached choice or the on/off switch may have changed."""
    return _generation[0]


def _bump() -> None:
    _generation[0] += 1


def autotune_enabled() -> bool:
    """Whether first uses of new keys are timed (else the operators' heuristics decide)."""
    forced = _override["enabled"]
    if forced is not None:
        return forced
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


def set_autotune(enabled: Optional[bool]) -> None:
    """Switch tuning on/off for this process; ``None`` returns to the ``PEDCONV_AUTOTUNE`` default."""
    _override["enabled"] = enabled
    _bump()


@dataclass
class TuneResult:
    """The fastest path of one key, the measured times (ms) and where the choice came from."""

    winner: str
    times_ms: Dict[str, float] = field(default_factory=dict)
    source: str = "tuned"  # tuned | broadcast | loaded


class PathCache:
    """Process-wide key -> :class:`TuneResult` (an explicit cache; :meth:`clear` empties it)."""

    def __init__(self) -> None:
        self._entries: Dict[Hashable, TuneResult] = {}

    def get(self, key: Hashable) -> Optional[TuneResult]:
        return self._entries.get(key)

    def put(self, key: Hashable, result: TuneResult) -> None:
        self._entries[key] = result
        _bump()

    def clear(self) -> None:
        self._entries.clear()
        _bump()

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> Iterator[Tuple[Hashable, TuneResult]]:
        return iter(list(self._entries.items()))

    def state_dict(self) -> Dict[Hashable, Dict[str, Any]]:
        """Plain, picklable form (keys are tuples of str/int/bool)."""
        return {key: {"winner": r.winner, "times_ms": dict(r.times_ms)} for key, r in self._entries.items()}

    def load_state_dict(self, state: Mapping[Hashable, Mapping[str, Any]], source: str = "loaded") -> None:
        """Adopt ``state``'s choices (overriding entries with the same key)."""
        for key, entry in state.items():
            self._entries[key] = TuneResult(str(entry["winner"]), dict(entry.get("times_ms", {})), source)
        _bump()


CACHE = PathCache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(candidates: Mapping[str, Callable[[], Any]], device: torch.device, rounds: int = 3,
            max_rounds: int = 12, budget_s: float = 0.25, warmup: int = 1,
            references: Sequence[str] = ()) -> Dict[str, float]:
    """Milliseconds per call of each candidate: the minimum over interleaved rounds.

    Every round times each (still competitive) candidate once, so that load from other processes hits
    all of them alike; at least ``rounds`` rounds, more (up to ``max_rounds``) while the rounds so far
    took less than ``budget_s`` in all, so that fast layers get enough samples to see through
    scheduling noise. After ``rounds`` rounds a candidate slower than ``_GIVE_UP`` times the best
    minimum drops out. ``references`` (e.g. the static conv, for the path report) are timed in every
    round but neither compete nor drop out.
    """
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    samples: Dict[str, List[float]] = {name: [] for name in names}
    active = list(names)
    spent = 0.0
    done = 0
    while active and (done < rounds or (done < max_rounds and spent < budget_s)):
        for name in active:
            _sync(device)
            start = time.perf_counter()
            candidates[name]()
            _sync(device)
            elapsed = time.perf_counter() - start
            samples[name].append(elapsed)
            spent += elapsed
        done += 1
        competing = [n for n in active if n not in references]
        if done >= rounds and competing:
            best = min(min(samples[n]) for n in competing)
            active = [n for n in active if n in references or min(samples[n]) <= _GIVE_UP * best]
        if not competing:
            break
    return {name: 1e3 * min(values) for name, values in samples.items()}


def choose(key: Hashable, candidates: Callable[[], Mapping[str, Callable[[], Any]]], device: torch.device,
           fallback: str, references: Sequence[str] = ()) -> Tuple[str, str]:
    """``(path, source)`` for ``key``: the cached winner, a fresh measurement, or ``fallback``.

    ``candidates()`` builds the timing functions (only called when tuning happens); entries named in
    ``references`` are timed for the record (``times_ms``) but never chosen. ``source`` is the
    cache entry's (``tuned`` in this process, ``broadcast`` from DDP rank 0, ``loaded``), ``only`` when
    a single path applies (nothing to time) or ``heuristic`` when tuning is off or none applies.
    """
    cached = CACHE.get(key)
    if cached is not None:
        return cached.winner, cached.source
    if not autotune_enabled():
        return fallback, "heuristic"
    fns = candidates()
    competing = [name for name in fns if name not in references]
    if len(competing) < 2:
        return (competing[0], "only") if competing else (fallback, "heuristic")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        times = measure(fns, device, references=references)
    winner = min(competing, key=times.__getitem__)
    CACHE.put(key, TuneResult(winner, times, "tuned"))
    return winner, "tuned"


def broadcast_cache(src: int = 0) -> int:
    """Give every DDP rank ``src``'s cached choices (a collective; no-op without a process group).

    Returns the number of entries received (0 when not distributed).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return 0
    payload: List[Any] = [CACHE.state_dict() if dist.get_rank() == src else None]
    dist.broadcast_object_list(payload, src=src)
    if dist.get_rank() != src and payload[0] is not None:
        CACHE.load_state_dict(payload[0], source="broadcast")
    return len(payload[0] or {})


def prepare_model(model: torch.nn.Module, train_shape: Optional[Tuple[int, ...]] = None,
                  eval_shape: Optional[Tuple[int, ...]] = None, device: Optional[torch.device] = None,
                  dtype: torch.dtype = torch.float32, channels_last: bool = False) -> None:
    """Tune every auto-path layer of ``model`` for a training and an evaluation batch shape up front.

    Runs ``model`` in eval mode (BatchNorm statistics and dropout untouched, no sampling noise, global
    RNG streams unchanged) on zeros: with gradients for ``train_shape`` (keys of a forward+backward) and
    without for ``eval_shape``. Nothing happens when tuning is off. Used by ``main.py`` and the profiler
    so that tuning time stays out of the timed steps and compiled graphs find their choice cached.
    """
    if not autotune_enabled():
        return
    param = next(model.parameters(), None)
    device = device or (param.device if param is not None else torch.device("cpu"))
    was_training = model.training
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if train_shape is not None:
                with torch.enable_grad():
                    x = torch.zeros(train_shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
                    model(x.requires_grad_(True))
            if eval_shape is not None:
                with torch.no_grad():
                    model(torch.zeros(eval_shape, device=device, dtype=dtype).contiguous(memory_format=fmt))
    finally:
        model.train(was_training)
