"""Device-aware timing helper and run options (image_classification/timing.py)."""

from __future__ import annotations

import time
from typing import List

import pytest
import torch

from image_classification import timing


def test_cpu_timer_is_wall_clock_per_call() -> None:
    calls: List[int] = []
    clock = iter([10.0, 10.5])
    synced: List[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(timing.time, "perf_counter", lambda: next(clock))
        seconds = timing.time_calls(lambda: calls.append(1), torch.device("cpu"), number=5,
                                    sync=lambda d: synced.append(d.type))
    assert calls == [1] * 5 and seconds == pytest.approx(0.1) and synced == ["cpu", "cpu"]


class _FakeEvent:
    """Stands in for torch.cuda.Event: records the order of operations; 40 ms between the two events."""

    log: List[str] = []

    def __init__(self) -> None:
        self.name = f"event{len([e for e in self.log if e.startswith('new')])}"
        self.log.append("new")

    def record(self) -> None:
        self.log.append(f"record {self.name}")

    def synchronize(self) -> None:
        self.log.append(f"wait {self.name}")

    def elapsed_time(self, end: _FakeEvent) -> float:
        return 40.0


def test_cuda_timer_brackets_the_calls_with_events() -> None:
    _FakeEvent.log = []
    seconds = timing.time_calls(lambda: _FakeEvent.log.append("call"), torch.device("cuda"), number=4,
                                event_factory=_FakeEvent, sync=lambda d: _FakeEvent.log.append("sync"))
    assert seconds == pytest.approx(0.01)  # 40 ms over 4 calls
    assert _FakeEvent.log == ["new", "new", "sync", "record event0", "call", "call", "call", "call",
                              "record event1", "wait event1"]


def test_time_calls_rejects_zero_calls() -> None:
    with pytest.raises(ValueError, match="number must be >= 1"):
        timing.time_calls(lambda: None, torch.device("cpu"), number=0)


def test_resolve_device() -> None:
    assert timing.resolve_device("cpu") == torch.device("cpu")
    assert timing.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="expected cpu, cuda, cuda:N or auto"):
        timing.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda given but CUDA is not available"):
            timing.resolve_device("cuda")


def test_autocast_context() -> None:
    with timing.autocast_context(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with timing.autocast_context(torch.device("cpu"), "none"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="--amp 'fp8'"):
        timing.autocast_context(torch.device("cpu"), "fp8")


def test_interleaved_samples_rounds_warmup_number_and_alternation() -> None:
    """The one harness: warm-up calls first, then rounds that call every function once (reversed every other round
    with ``alternate``), ``number`` calls per sample (per function from a mapping), ``repeats`` samples each."""
    from image_classification.timing import interleaved_samples

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    samples = interleaved_samples(fns, torch.device("cpu"), 2, warmup=1, number={"a": 2, "b": 1, "c": 1},
                                  alternate=True, first_round=1)
    assert calls == ["a", "b", "c",  # warm-up
                     "c", "b", "a", "a",  # round 1: reversed (first_round 1 is odd); a twice per sample
                     "a", "a", "b", "c"]
    assert {name: len(values) for name, values in samples.items()} == {"a": 2, "b": 2, "c": 2}
    assert all(value >= 0 for values in samples.values() for value in values)


def test_interleaved_samples_stops_where_before_call_raises() -> None:
    from image_classification.timing import interleaved_samples

    calls = []

    def deadline() -> None:
        if len(calls) >= 3:
            raise TimeoutError("budget")

    with pytest.raises(TimeoutError):
        interleaved_samples({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, torch.device("cpu"),
                            5, before_call=deadline)
    assert calls == ["a", "b", "a"]


def test_calls_for_duration_is_bounded() -> None:
    from image_classification.timing import calls_for_duration

    assert calls_for_duration(lambda: None, torch.device("cpu"), 10.0, cap=7) == 7
    assert calls_for_duration(lambda: time.sleep(0.02), torch.device("cpu"), 0.001) == 1
