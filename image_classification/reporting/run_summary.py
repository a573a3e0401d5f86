"""One row per run read from its raport (:func:`summarize`), and the results table of many runs (markdown and
CSV), as ``scripts/collect_results.py`` prints them."""

from __future__ import annotations

import csv
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence

from .raport import _number, epoch_metrics, iteration_metrics, parameters, read_raport, summary_data

__all__ = ["COLUMNS", "RunSummary", "markdown_table", "robust_summary", "summarize", "write_csv"]


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


def _mean(values: Iterable[float]) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def _milliseconds(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds * 1000.0


def summarize(path: Path) -> RunSummary:
    """Read one raport into a :class:`RunSummary`."""
    records = read_raport(path)
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
        val_latency_ms=_milliseconds(_mean(latency.values())),
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
