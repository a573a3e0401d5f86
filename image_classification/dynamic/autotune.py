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

Bounded and remembered: a process spends at most :func:`set_budget` seconds timing (``main.py
--autotune-budget``); keys met after that use the heuristic (source ``budget``). Choices persist on disk
(:func:`load_cache_file` / :func:`save_cache_file`) in JSON files keyed by a fingerprint of the machine and the
software (:func:`fingerprint`: CPU or GPU model, core and thread counts, torch version), in a user cache
directory (:func:`default_cache_file`: ``$PEDCONV_CACHE_DIR``, else ``$XDG_CACHE_HOME/pedconv``, else
``~/.cache/pedconv``) and in the run's workspace, as cuDNN's and inductor's caches do, so that evaluation,
resumes and later runs on the same machine start at once. Entries of another fingerprint are ignored;
only timed choices are written (never heuristic or budget fall-backs, which a later run may still tune).

Timing (:func:`measure`): one warm-up call per candidate, then interleaved rounds (each round times
every candidate once) - at least 3, up to 12 while they take under 0.25 s - and each candidate's time
is its minimum (other processes only ever add time). After the first 3 rounds a candidate slower than
``_GIVE_UP`` times the best drops out. On CUDA the device is synchronised around each call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Dict, Hashable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from image_classification.atomic_files import write_json_atomic
from image_classification.timing import interleaved_samples

__all__ = [
    "ENV_VAR",
    "CACHE",
    "generation",
    "TuneResult",
    "PathCache",
    "autotune_enabled",
    "set_autotune",
    "measure",
    "MeasurementCut",
    "choose",
    "broadcast_cache",
    "prepare_model",
    "set_budget",
    "tuning_seconds",
    "CACHE_DIR_ENV",
    "fingerprint",
    "default_cache_file",
    "load_cache_file",
    "save_cache_file",
]

ENV_VAR = "PEDCONV_AUTOTUNE"
CACHE_DIR_ENV = "PEDCONV_CACHE_DIR"
_GIVE_UP = 4.0
_FILE_VERSION = 1
_override: Dict[str, Optional[bool]] = {"enabled": None}
_budget: Dict[str, Optional[float]] = {"seconds": None, "spent": 0.0}  # None: unbounded
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


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Tuning off inside the block (the heuristics decide; nothing is timed), the previous switch restored after."""
    previous = _override["enabled"]
    set_autotune(False)
    try:
        yield
    finally:
        set_autotune(previous)


def set_budget(seconds: Optional[float]) -> None:
    """At most ``seconds`` of timing from now on in this process (``None``: unbounded); past it, new keys
    take the heuristic with source ``budget``."""
    _budget["seconds"] = None if seconds is None else max(0.0, float(seconds))
    _budget["spent"] = 0.0


def tuning_seconds() -> float:
    """Seconds spent timing candidates since the last :func:`set_budget`."""
    return float(_budget["spent"] or 0.0)


def _budget_left() -> bool:
    limit = _budget["seconds"]
    return limit is None or (_budget["spent"] or 0.0) < limit


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

    def drop(self, key: Hashable) -> None:
        """Forget ``key``'s entry (if any)."""
        if self._entries.pop(key, None) is not None:
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


class MeasurementCut(RuntimeError):
    """:func:`measure` reached its deadline before every candidate had its rounds."""


def measure(candidates: Mapping[str, Callable[[], Any]], device: torch.device, rounds: int = 3,
            max_rounds: int = 12, budget_s: float = 0.25, warmup: int = 1,
            references: Sequence[str] = (), deadline: Optional[float] = None) -> Dict[str, float]:
    """Milliseconds per call of each candidate: the minimum over interleaved rounds.

    Every round times each (still competitive) candidate once, so that load from other processes hits
    all of them alike; at least ``rounds`` rounds, more (up to ``max_rounds``) while the rounds so far
    took less than ``budget_s`` in all, so that fast layers get enough samples to see through
    scheduling noise. After ``rounds`` rounds a candidate slower than ``_GIVE_UP`` times the best
    minimum drops out. ``references`` (e.g. the static conv, for the path report) are timed in every
    round but neither compete nor drop out. ``deadline`` (a ``time.perf_counter()`` value): no call starts after
    it; a measurement it cuts short raises :class:`MeasurementCut`.
    """
    names = list(candidates)
    samples: Dict[str, List[float]] = {name: [] for name in names}

    def check_deadline() -> None:
        if deadline is not None and time.perf_counter() > deadline:
            raise MeasurementCut("the timing budget ran out during the measurement")

    interleaved_samples(candidates, device, 0, warmup=warmup, before_call=check_deadline)
    active = list(names)
    spent = 0.0
    done = 0
    while active and (done < rounds or (done < max_rounds and spent < budget_s)):
        # one round at a time: after each, the slow candidates drop out and the budget is checked
        for name, values in interleaved_samples({n: candidates[n] for n in active}, device, 1,
                                                before_call=check_deadline).items():
            samples[name].extend(values)
            spent += sum(values)
        done += 1
        competing = [n for n in active if n not in references]
        if done >= rounds and competing:
            best = min(min(samples[n]) for n in competing)
            active = [n for n in active if n in references or min(samples[n]) <= _GIVE_UP * best]
        if not competing:
            break
    return {name: 1e3 * min(values) for name, values in samples.items()}


def choose(key: Hashable, candidates: Callable[[], Mapping[str, Callable[[], Any]]], device: torch.device,
           fallback: str, references: Sequence[str] = (), valid: Optional[Collection[str]] = None,
           plausible: Optional[Callable[[Mapping[str, float], str], bool]] = None) -> Tuple[str, str]:
    """``(path, source)`` for ``key``: the cached winner, a fresh measurement, or ``fallback``.

    ``candidates()`` builds the timing functions (only called when tuning happens); entries named in
    ``references`` are timed for the record (``times_ms``) but never chosen. ``source`` is the
    cache entry's (``tuned`` in this process, ``broadcast`` from DDP rank 0, ``loaded`` / ``disk``), ``only``
    when a single path applies (nothing to time), ``heuristic`` when tuning is off or none applies, ``budget``
    when the tuning budget (:func:`set_budget`) is spent. ``valid``: the paths that can run here; a cached winner
    outside them (a cache file from another version that renamed a path, a ``triton`` winner replayed where the
    kernels cannot run) is dropped and the key decided afresh.

    A measurement the budget cut short is not used (source ``budget``). ``plausible(times_ms, winner)``: whether the
    timings can be true (e.g. no path of a dynamic conv beats the static conv it contains by far); one that cannot
    (another process's load hit the rounds unevenly) is taken again, and a second such leaves the key to
    ``fallback`` with source ``noisy``, which, like ``budget``, is never written to disk.
    """
    cached = CACHE.get(key)
    if cached is not None and valid is not None and cached.winner not in valid:
        CACHE.drop(key)
        cached = None
    if cached is not None:
        return cached.winner, cached.source
    if not autotune_enabled():
        return fallback, "heuristic"
    fns = candidates()
    competing = [name for name in fns if name not in references]
    if len(competing) < 2:
        return (competing[0], "only") if competing else (fallback, "heuristic")
    if not _budget_left():  # recorded, so that DDP ranks agree on it; never written to disk
        CACHE.put(key, TuneResult(fallback, {}, "budget"))
        return fallback, "budget"
    times: Dict[str, float] = {}
    for _attempt in range(2):  # an implausible measurement is taken once more
        started = time.perf_counter()
        limit = _budget["seconds"]
        deadline = None if limit is None else started + limit - (_budget["spent"] or 0.0)
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                times = measure(fns, device, references=references, deadline=deadline)
        except MeasurementCut:  # too few samples to trust: the heuristic, as for keys met after the budget
            CACHE.put(key, TuneResult(fallback, {}, "budget"))
            return fallback, "budget"
        finally:
            _budget["spent"] = (_budget["spent"] or 0.0) + time.perf_counter() - started
        winner = min(competing, key=times.__getitem__)
        if plausible is None or plausible(times, winner):
            CACHE.put(key, TuneResult(winner, times, "tuned"))
            return winner, "tuned"
    CACHE.put(key, TuneResult(fallback, times, "noisy"))  # twice implausible: heuristic, never written to disk
    return fallback, "noisy"


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
                  dtype: torch.dtype = torch.float32, channels_last: bool = False,
                  layers: Optional[Sequence[torch.nn.Module]] = None, show: bool = False) -> None:
    """Tune every auto-path layer of ``model`` for a training and an evaluation batch shape up front.

    Runs ``model`` in eval mode (BatchNorm statistics and dropout untouched, no sampling noise, global
    RNG streams unchanged) on zeros: with gradients for ``train_shape`` (keys of a forward+backward) and
    without for ``eval_shape``. Nothing happens when tuning is off. Used by ``main.py`` and the profiler
    so that tuning time stays out of the timed steps and compiled graphs find their choice cached.

    ``show``: a tqdm bar on stderr over ``layers`` (the auto-path layers, one step per layer and pass) and a
    closing line with what was timed, found cached and left to the heuristic, and how long it took.
    """
    if not autotune_enabled():
        return
    passes = [s for s in (train_shape, eval_shape) if s is not None]
    with _Progress(layers or [], len(passes), show):
        _run_passes(model, train_shape, eval_shape, device, dtype, channels_last)


def _run_passes(model: torch.nn.Module, train_shape: Optional[Tuple[int, ...]], eval_shape: Optional[Tuple[int, ...]],
                device: Optional[torch.device], dtype: torch.dtype, channels_last: bool) -> None:
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


#: seconds between the progress lines of path tuning when stderr is not a terminal (a log file, a pipe)
PROGRESS_EVERY_S = 15.0


class _Progress:
    """tqdm over the layers' forwards of :func:`prepare_model` (forward hooks), then a one-line summary; without a
    terminal, a line at the start, one every :data:`PROGRESS_EVERY_S` and the summary."""

    def __init__(self, layers: Sequence[torch.nn.Module], passes: int, show: bool) -> None:
        self.layers, self.passes, self.show = list(layers), passes, show and bool(layers)
        self.handles: List[Any] = []
        self.bar: Any = None

    def __enter__(self) -> _Progress:
        self.started, self.spent = time.perf_counter(), tuning_seconds()
        self.before = {key for key, _ in CACHE.items()}
        if self.show:
            from tqdm import tqdm

            total = len(self.layers) * self.passes
            limit = _budget["seconds"]
            budget = f", budget {limit:g} s" if limit is not None else ", no time budget"
            self.total, self.done, self.said = total, 0, time.perf_counter()
            if not sys.stderr.isatty():  # a log file: one line now, one every PROGRESS_EVERY_S, the summary at the end
                print(f"tuning PEDConv paths: {len(self.layers)} layers x {self.passes} pass(es){budget} ...",
                      file=sys.stderr, flush=True)
            self.bar = tqdm(total=total, desc=f"tuning PEDConv paths ({len(self.layers)} layers{budget})",
                            unit="layer", file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.5,
                            disable=not sys.stderr.isatty())
            self.handles = [m.register_forward_hook(self._step) for m in self.layers]
        return self

    def _step(self, *_: Any) -> None:  # a forward hook: returning None keeps the layer's output
        self.bar.update(1)
        self.done += 1
        now = time.perf_counter()
        if not sys.stderr.isatty() and now - self.said >= PROGRESS_EVERY_S:
            print(f"tuning PEDConv paths: {self.done}/{self.total} layer forwards timed after "
                  f"{now - self.started:.0f} s", file=sys.stderr, flush=True)
            self.said = now

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        if self.bar is None:
            return
        self.bar.close()
        sources: Dict[str, int] = {}
        for key, result in CACHE.items():
            if key not in self.before:
                sources[result.source] = sources.get(result.source, 0) + 1
        cached = len(self.before)
        parts = [f"{sources.get('tuned', 0)} new layer shape(s) timed in {tuning_seconds() - self.spent:.1f} s"]
        if cached:
            parts.append(f"{cached} known from the path cache")
        if sources.get("budget"):
            parts.append(f"{sources['budget']} left to the heuristic (--autotune-budget {_budget['seconds']:g} s "
                         "spent; a later run tunes them)")
        if sources.get("noisy"):
            parts.append(f"{sources['noisy']} left to the heuristic (their timings were implausible twice: other "
                         "processes load this machine; a later run tunes them)")
        print(f"PEDConv paths ready in {time.perf_counter() - self.started:.1f} s: " + ", ".join(parts),
              file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- disk cache
def fingerprint(device: Optional[torch.device] = None) -> str:
    """Short hash of what path timings depend on besides the key: processor (or GPU) model, core count,
    torch's thread count and version, Triton's version on CUDA."""
    facts: Dict[str, Any] = {"machine": platform.machine(), "cpus": os.cpu_count(),
                             "threads": torch.get_num_threads(), "torch": torch.__version__.split("+")[0],
                             "cpu": _cpu_model()}
    if device is not None and device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["capability"] = list(torch.cuda.get_device_capability(device))
        try:
            import triton

            facts["triton"] = triton.__version__
        except ImportError:  # pragma: no cover - CUDA builds ship Triton
            facts["triton"] = None
    text = json.dumps(facts, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def default_cache_file(device: Optional[torch.device] = None) -> Path:
    """The user-level cache file of this machine and software: ``paths-<fingerprint>.json`` in
    ``$PEDCONV_CACHE_DIR``, else ``$XDG_CACHE_HOME/pedconv``, else ``~/.cache/pedconv``."""
    root = os.environ.get(CACHE_DIR_ENV)
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "pedconv")
    return Path(root) / f"paths-{fingerprint(device)}.json"


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def load_cache_file(path: Union[str, Path], device: Optional[torch.device] = None) -> int:
    """Adopt the choices of ``path`` made under this :func:`fingerprint` (source ``disk``); returns how many.

    A missing file is 0; an unreadable, corrupt or foreign file is 0 with a one-line note on stderr (it is
    only a cache: the layers are tuned again)."""
    path = Path(path)
    if not path.is_file():
        return 0
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != _FILE_VERSION or data.get("fingerprint") != fingerprint(device):
            return 0
        state = {_as_tuple(key): {"winner": str(entry["winner"]), "times_ms": dict(entry.get("times_ms", {}))}
                 for key, entry in data["entries"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        print(f"note: ignoring the PEDConv path cache {path} ({type(exc).__name__}: {exc}); paths are tuned again",
              file=sys.stderr, flush=True)
        return 0
    fresh = {key: entry for key, entry in state.items() if CACHE.get(key) is None}
    if fresh:
        CACHE.load_state_dict(fresh, source="disk")
    return len(fresh)


def save_cache_file(path: Union[str, Path], device: Optional[torch.device] = None) -> int:
    """Write the timed choices (sources tuned / broadcast / disk / loaded) to ``path``, merged with what the
    file already holds for this fingerprint; atomic (temporary file + rename). Returns the entries written;
    a directory that cannot be written is a one-line note on stderr and 0 (only a cache)."""
    path = Path(path)
    mine = fingerprint(device)
    merged: Dict[str, Any] = {}
    try:
        old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if old.get("version") == _FILE_VERSION and old.get("fingerprint") == mine:
            merged = {json.dumps(key): [key, entry] for key, entry in old["entries"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        merged = {}
    for key, result in CACHE.items():
        if result.source in ("tuned", "broadcast", "disk", "loaded"):
            plain = json.loads(json.dumps(key))
            merged[json.dumps(plain)] = [plain, {"winner": result.winner, "times_ms": result.times_ms}]
    payload = {"version": _FILE_VERSION, "fingerprint": mine, "entries": list(merged.values())}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, payload, indent=None)
    except OSError as exc:
        print(f"note: cannot write the PEDConv path cache {path} ({exc.strerror or exc}); the next run tunes again",
              file=sys.stderr, flush=True)
        return 0
    return len(merged)
