"""Raport (DLLogger JSON lines) and console progress.

The raport is written in the exact format of NVIDIA dllogger's ``JSONStreamBackend`` (dllogger itself is
not installable here): one record per line, ``DLLL `` followed by a JSON object::

    DLLL {"timestamp": "1700000000.1", "datetime": "2023-11-14 22:13:20.1", "elapsedtime": "0.5",
          "type": "LOG", "step": [0, 10], "data": {"train.loss": 6.9}}
    DLLL {"timestamp": ..., "elapsedtime": ..., "datetime": ..., "type": "METADATA",
          "metric": "train.loss", "metadata": {"unit": null, "format": ":>5.5f"}}

As in DeepLearningExamples the arguments are one ``LOG`` record with ``step`` ``"PARAMETER"``, iteration
records have ``step`` ``[epoch, iteration]``, epoch records ``[epoch]`` and the final summary ``[]``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from datetime import datetime
from typing import Any, Dict, Iterable, List, NoReturn, Optional, Sequence, Tuple, Union

from image_classification.reporting.raport import raport_values, read_raport

__all__ = [
    "METRICS",
    "RaportWriter",
    "Progress",
    "read_raport",
    "raport_values",
]

Step = Union[str, Sequence[int]]
_LOG = logging.getLogger(__name__)

_LOSS = {"unit": None, "format": ":>5.5f"}
_IPS = {"unit": "images/s", "format": ":>.2f"}
_PCT = {"unit": "%", "format": ":>5.2f"}
_SEC = {"unit": "s", "format": ":>5.5f"}

METRICS: Dict[str, Dict[str, Any]] = {
    "train.loss": _LOSS,
    "train.infomax": _LOSS,
    "train.top1": _PCT,
    "train.lr": {"unit": None, "format": ":>5.6f"},
    "train.compute_ips": _IPS,
    "train.total_ips": _IPS,
    "train.data_time": _SEC,
    "train.compute_time": _SEC,
}
for _prefix in ("val", "val_ema"):
    METRICS.update(
        {
            f"{_prefix}.top1": _PCT,
            f"{_prefix}.top5": _PCT,
            f"{_prefix}.loss": _LOSS,
            f"{_prefix}.compute_ips": _IPS,
            f"{_prefix}.compute_latency": _SEC,
            f"{_prefix}.compute_latency_at95": _SEC,
            f"{_prefix}.compute_latency_at99": _SEC,
            f"{_prefix}.samples": {"unit": "images", "format": ":d"},
        }
    )
METRICS.update({"summary.best_top1": _PCT, "summary.epochs": {"unit": None, "format": ":d"}})


class RaportError(RuntimeError):
    """The raport could not be written (full disk, quota, I/O error): one line naming the file (exit status 2)."""


class RaportWriter:
    """Append-only DLLogger JSON-lines writer; a no-op when ``path`` is None (non-zero ranks)."""

    def __init__(self, path: Optional[str], append: bool = False) -> None:
        self.path = path
        self.start = datetime.now()
        #: sinks that get every LOG record too (``log(step, data)``, ``close()``): the TensorBoard writer of
        #: ``--tensorboard`` (:class:`image_classification.reporting.tensorboard.TensorBoardScalars`)
        self.mirrors: List[Any] = []
        if path and append:
            _drop_torn_last_line(path)
        self._file = open(path, "a" if append else "w", buffering=1) if path else None

    def _write(self, record: Dict[str, Any]) -> None:
        if self._file is not None:
            try:
                self._file.write("DLLL " + json.dumps(record, default=_jsonable) + "\n")
            except OSError as exc:
                self._fail(exc)

    def _fail(self, exc: OSError) -> NoReturn:
        import shutil

        try:
            free = f"{shutil.disk_usage(os.path.dirname(os.path.abspath(str(self.path)))).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        file, self._file = self._file, None  # nothing more goes to a file that cannot take it
        with contextlib.suppress(OSError):
            file.close()  # type: ignore[union-attr]  # the raport file is open whenever a write failed
        raise RaportError(f"cannot write the raport {self.path}: {exc.strerror or exc} ({free}); the records "
                          "before this one are in it, the last checkpoint is intact: free space, then continue "
                          "with --resume auto") from None

    def _times(self) -> Tuple[datetime, float]:
        now = datetime.now()
        return now, (now - self.start).total_seconds()

    def log(self, step: Step, data: Dict[str, Any]) -> None:
        """A ``LOG`` record (``step`` is a tuple of ints, ``"PARAMETER"``, or ``()`` for the summary)."""
        now, elapsed = self._times()
        step_value = step if isinstance(step, str) else list(step)
        self._write(
            dict(
                timestamp=str(now.timestamp()),
                datetime=str(now),
                elapsedtime=str(elapsed),
                type="LOG",
                step=step_value,
                data=data,
            )
        )
        for mirror in self.mirrors:
            mirror.log(step, data)

    def metadata(self, metric: str, meta: Dict[str, Any]) -> None:
        now, elapsed = self._times()
        self._write(
            dict(
                timestamp=str(now.timestamp()),
                elapsedtime=str(elapsed),
                datetime=str(now),
                type="METADATA",
                metric=metric,
                metadata=meta,
            )
        )

    def log_parameters(self, params: Dict[str, Any]) -> None:
        self.log("PARAMETER", params)

    def log_metadata(self, names: Optional[Iterable[str]] = None) -> None:
        for name in names if names is not None else METRICS:
            self.metadata(name, METRICS[name])

    def close(self) -> None:
        mirrors, self.mirrors = self.mirrors, []
        try:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError as exc:
                    self._fail(exc)
                self._file = None
        finally:
            for mirror in mirrors:
                mirror.close()


def _drop_torn_last_line(path: str) -> None:
    """Cut a partial last record (a run killed mid-write: no final newline) off a raport about to be
    continued, so that the first appended record starts on a line of its own. The partial record was never
    complete, and :func:`read_raport` skips it anyway."""
    try:
        with open(path, "rb+") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size == 0:
                return
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return
            keep = size - 1
            while keep > 0:
                chunk_start = max(0, keep - 65536)
                handle.seek(chunk_start)
                newline = handle.read(keep - chunk_start).rfind(b"\n")
                if newline >= 0:
                    keep = chunk_start + newline + 1
                    break
                keep = chunk_start
            handle.truncate(keep)
            _LOG.warning("raport %s: removed a partial last record (%d bytes) left by a run killed mid-write",
                         path, size - keep)
    except FileNotFoundError:
        return


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _format(metrics: Dict[str, float]) -> str:
    parts = []
    for name, value in metrics.items():
        short = name.split(".", 1)[-1]
        parts.append(f"{short} {value:.4g}" if isinstance(value, float) else f"{short} {value}")
    return "  ".join(parts)


class Progress:
    """Per-epoch console progress: a tqdm bar on a terminal (moving every iteration, metrics every ``print_freq``),
    plain lines every ``print_freq`` otherwise, and in between one at least every ``quiet_s`` seconds (:meth:`tick`).

    Silent when ``enabled`` is false (every rank but 0).
    """

    def __init__(self, desc: str, total: int, print_freq: int, enabled: bool = True, use_tqdm: Optional[bool] = None,
                 quiet_s: float = 30.0):
        self.desc = desc
        self.total = total
        self.print_freq = max(1, print_freq)
        self.enabled = enabled
        self.started = self._last_line = time.perf_counter()
        self.quiet_s = quiet_s
        if use_tqdm is None:
            use_tqdm = sys.stderr.isatty()
        self._bar = None
        if enabled and use_tqdm:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True, file=sys.stderr)
        self._done = 0

    def skip_to(self, iteration: int) -> None:
        """Count the iterations before ``iteration`` as done without printing (a resumed run)."""
        if self.enabled and self._bar is not None:
            self._bar.update(iteration - self._done)
        self._done = iteration

    def update(self, iteration: int, metrics: Dict[str, float]) -> None:
        """``iteration`` (1-based) is done; ``metrics`` are the latest window averages."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(iteration - self._done)
            self._bar.set_postfix_str(_format(metrics), refresh=False)
        else:
            print(f"{self.desc} [{iteration}/{self.total}]  {_format(metrics)}", flush=True)
            self._last_line = time.perf_counter()
        self._done = iteration

    def tick(self, iteration: int) -> None:
        """``iteration`` is done, between two :meth:`update` s (no metrics: they cost a host sync): the bar moves on
        every iteration; without a bar a line says how far the pass got when none was printed for ``quiet_s``."""
        if not self.enabled or iteration <= self._done:
            return
        if self._bar is not None:
            self._bar.update(iteration - self._done)
            self._done = iteration
        elif time.perf_counter() - self._last_line >= self.quiet_s:
            elapsed = time.perf_counter() - self.started
            print(f"{self.desc} [{iteration}/{self.total}]  ({elapsed:.0f} s; metrics every {self.print_freq} "
                  "iterations)", flush=True)
            self._last_line = time.perf_counter()

    def close(self, summary: Optional[Dict[str, float]] = None, stopped_at: Optional[int] = None) -> None:
        """The closing line: ``done in``, or for an epoch a signal cut short after iteration ``stopped_at``,
        ``stopped at [i/total] after`` (its metrics cover the iterations run)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if summary:
            elapsed = time.perf_counter() - self.started
            what = f"stopped at [{stopped_at}/{self.total}] after" if stopped_at is not None else "done in"
            print(f"{self.desc} {what} {elapsed:.1f}s  {_format(summary)}", flush=True)
