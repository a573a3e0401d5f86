"""Device-aware timing helper and run options (image_classification/timing.py)."""

from __future__ import annotations

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
