"""The one reader of raports (DLLogger JSON lines, ``DLLL {...}``) and queries over their records.

``main.py`` writes a raport with :class:`image_classification.training.logger.RaportWriter`; the trainer
(``--resume``/``--overwrite`` checks), ``scripts/collect_results.py`` and ``scripts/fashion_mnist_study.py`` read
it with :func:`read_raport`.

A run killed while writing a record (SIGKILL, OOM, power loss) leaves a truncated last line: it is skipped,
never an error (the record was never complete; a resumed run's writer removes it before appending, see
``RaportWriter``). A malformed line anywhere else is corruption and a ``ValueError`` naming ``path:line``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

__all__ = [
    "PREFIX",
    "epoch_metrics",
    "iteration_metrics",
    "loss_curve",
    "parameters",
    "raport_values",
    "read_raport",
    "summary_data",
]

PREFIX = "DLLL "


def read_raport(path: Union[str, os.PathLike[str]]) -> List[Dict[str, Any]]:
    """All records of a raport (lines starting with ``DLLL ``), in order; other lines are ignored.

    A truncated last line (a run killed mid-write) is skipped.

    Raises:
        ValueError: a ``DLLL`` line other than the last whose JSON does not parse (names ``path:line``).
        OSError, UnicodeDecodeError: the file cannot be read.
    """
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line.startswith(PREFIX):
            continue
        try:
            records.append(json.loads(line[len(PREFIX):]))
        except json.JSONDecodeError as exc:
            if number == len(lines):  # a run killed mid-write leaves a truncated last line
                break
            raise ValueError(f"{path}:{number}: malformed DLLL record ({exc.msg})") from None
    return records


def raport_values(records: Iterable[Dict[str, Any]], metric: str) -> List[Tuple[Any, Any]]:
    """``(step, value)`` of every LOG record holding ``metric``, in order."""
    return [
        (record["step"], record["data"][metric])
        for record in records
        if record.get("type") == "LOG" and metric in record.get("data", {})
    ]


def _step(record: Dict[str, Any]) -> Any:
    return record.get("step")


def parameters(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The run's arguments: the data of the record(s) whose step is ``PARAMETER``."""
    params: Dict[str, Any] = {}
    for record in records:
        if _step(record) == "PARAMETER":
            params.update(record.get("data", {}))
    return params


def _number(value: Any) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def epoch_metrics(records: Sequence[Dict[str, Any]], key: str) -> Dict[int, float]:
    """``{epoch: value}`` of a per-epoch metric (records whose step is ``[epoch]``), last value wins."""
    values: Dict[int, float] = {}
    for record in records:
        step = _step(record)
        data = record.get("data", {})
        if isinstance(step, list) and len(step) == 1 and key in data:
            number = _number(data[key])
            if number is not None:
                values[int(step[0])] = number
    return values


def iteration_metrics(records: Sequence[Dict[str, Any]], key: str) -> List[float]:
    """All values of a per-iteration metric (records whose step is ``[epoch, iteration]``)."""
    out = []
    for record in records:
        step = _step(record)
        data = record.get("data", {})
        if isinstance(step, list) and len(step) >= 2 and key in data:
            number = _number(data[key])
            if number is not None:
                out.append(number)
    return out


def summary_data(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The final summary: data of LOG records with an empty step (``[]`` or ``()``)."""
    data: Dict[str, Any] = {}
    for record in records:
        step = _step(record)
        if isinstance(step, list) and not step and record.get("type", "LOG") == "LOG":
            data.update(record.get("data", {}))
    return data


def loss_curve(records: Sequence[Dict[str, Any]]) -> List[Tuple[float, float]]:
    """``(epoch + iteration / iterations_in_epoch, train.loss)`` of every per-iteration record."""
    points = []
    for record in records:
        step, data = record.get("step"), record.get("data", {})
        if isinstance(step, list) and len(step) == 2 and "train.loss" in data:
            points.append((int(step[0]), int(step[1]), float(data["train.loss"])))
    length: Dict[int, int] = {}
    for epoch, it, _ in points:
        length[epoch] = max(length.get(epoch, 0), it)
    return [(epoch + it / length[epoch], loss) for epoch, it, loss in points]
