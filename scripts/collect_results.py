#!/usr/bin/env python
"""Collect DLLogger raport files into one results table (markdown + CSV).

A raport (``--raport-file``, default ``raport.json`` in the workspace) holds DLLogger JSON lines
``DLLL {...}``: a PARAMETER record with every argument of the run, per-iteration ``train.*`` records,
per-epoch ``val.*`` records and a final summary. This script finds raports under the given paths
(files, or directories searched recursively for ``*.json`` files holding ``DLLL`` lines) and writes
one row per run: arch, operator spec, placement, epochs done, best and last ``val.top1``/``val.top5``,
mean training throughput and validation latency, and for evaluations under attack (``--attack pgd``) the robust
top-1 per attack (``val_pgd<K>.top1``).

Usage:
    python scripts/collect_results.py logs/ --markdown logs/results.md --csv logs/results.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

PREFIX = "DLLL "


@dataclass
class RunSummary:
    """One run's figures, read from its raport file."""

    raport: str
    arch: str = ""
    conv: str = ""
    placement: str = ""
    seed: str = ""
    epochs_planned: Optional[int] = None
    epochs_done: int = 0
    best_top1: Optional[float] = None
    last_top1: Optional[float] = None
    best_top5: Optional[float] = None
    last_val_loss: Optional[float] = None
    train_ips: Optional[float] = None
    val_latency_ms: Optional[float] = None
    robust_top1: str = ""  # evaluations under attack (--attack pgd): "PGD-10 32.80; PGD-50 31.90"
    complete: bool = False


def read_records(path: Path) -> List[Dict[str, Any]]:
    """Parse the ``DLLL {...}`` lines of a raport; other lines are skipped, a bad JSON line is an error."""
    records = []
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line.startswith(PREFIX):
            continue
        try:
            records.append(json.loads(line[len(PREFIX) :]))
        except json.JSONDecodeError as exc:
            if number == len(lines):  # a run killed mid-write leaves a truncated last line
                break
            raise ValueError(f"{path}:{number}: not a DLLogger JSON line ({exc.msg})") from None
    return records


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


def _mean(values: Iterable[float]) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def summarize(path: Path) -> RunSummary:
    """Read one raport into a :class:`RunSummary`."""
    records = read_records(path)
    params = parameters(records)
    top1 = epoch_metrics(records, "val.top1")
    top5 = epoch_metrics(records, "val.top5")
    loss = epoch_metrics(records, "val.loss")
    latency = epoch_metrics(records, "val.compute_latency")
    ips = list(epoch_metrics(records, "train.total_ips").values()) or iteration_metrics(records, "train.total_ips")
    planned = int(params["epochs"]) if _number(params.get("epochs")) is not None else None
    last_epoch = max(top1) if top1 else None
    summary = summary_data(records)
    done = _number(summary.get("summary.epochs"))
    if params.get("evaluate"):
        complete = bool(summary)
    else:
        complete = bool(summary) and done is not None and (planned is None or done >= planned)
    return RunSummary(
        raport=str(path),
        arch=str(params.get("arch", "")),
        conv=str(params.get("conv", "")),
        placement=str(params.get("placement", "")),
        seed=str(params.get("seed", "")),
        epochs_planned=planned,
        epochs_done=len(top1),
        best_top1=max(top1.values()) if top1 else None,
        last_top1=top1[last_epoch] if last_epoch is not None else None,
        best_top5=max(top5.values()) if top5 else None,
        last_val_loss=loss[max(loss)] if loss else None,
        train_ips=_mean(ips),
        val_latency_ms=(_mean(latency.values()) * 1000.0) if latency else None,
        robust_top1=robust_summary(summary),
        complete=complete,
    )


def robust_summary(summary: Dict[str, Any]) -> str:
    """``PGD-10 32.80; PGD-50 31.90`` from a summary's ``val_pgd<K>.top1`` metrics (the model, not its EMA)."""
    found = []
    for key, value in summary.items():
        match = re.fullmatch(r"val_pgd(\d+)\.top1", key)
        number = _number(value)
        if match and number is not None:
            found.append((int(match.group(1)), number))
    return "; ".join(f"PGD-{steps} {top1:.2f}" for steps, top1 in sorted(found))


def find_raports(paths: Sequence[Path]) -> List[Path]:
    """Raport files among ``paths``: files as given, directories searched for ``*.json`` with DLLL lines."""
    found: List[Path] = []
    for path in paths:
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            for candidate in sorted(path.rglob("*.json")):
                with open(candidate, encoding="utf-8", errors="replace") as handle:
                    if any(line.startswith(PREFIX) for line in handle):
                        found.append(candidate)
        else:
            raise SystemExit(f"error: no such file or directory: {path}")
    return found


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


COLUMNS = [
    ("arch", "arch"),
    ("conv", "operator"),
    ("placement", "placement"),
    ("seed", "seed"),
    ("epochs_done", "epochs"),
    ("best_top1", "best top-1 (%)"),
    ("last_top1", "last top-1 (%)"),
    ("best_top5", "best top-5 (%)"),
    ("train_ips", "train img/s"),
    ("val_latency_ms", "val latency (ms/batch)"),
    ("robust_top1", "robust top-1 (%)"),
    ("complete", "complete"),
    ("raport", "raport"),
]


def markdown_table(rows: Sequence[RunSummary]) -> str:
    """A GitHub markdown table of ``rows``."""
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(getattr(row, key)) for key, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[RunSummary], path: Path) -> None:
    names = [f.name for f in fields(RunSummary)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="raport files or directories to search")
    parser.add_argument("--markdown", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--csv", type=Path, default=None, help="write the CSV table here")
    parser.add_argument(
        "--complete", action="store_true", help="print nothing; exit 0 when every raport is of a finished run, else 1"
    )
    args = parser.parse_args(argv)
    raports = find_raports(args.paths)
    if not raports:
        raise SystemExit("error: no raport files (DLLogger JSON lines) found under: " + " ".join(map(str, args.paths)))
    rows = []
    for path in raports:
        try:
            rows.append(summarize(path))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"error: {exc}") from None
    if args.complete:
        return 0 if all(row.complete for row in rows) else 1
    rows.sort(key=lambda r: (r.arch, r.conv, r.placement, r.seed, r.raport))
    table = markdown_table(rows)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table, encoding="utf-8")
    if args.csv:
        write_csv(rows, args.csv)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
