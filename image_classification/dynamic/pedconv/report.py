"""Which execution path each PEDConv layer used, per input shape: :func:`path_report` and its text table
(``--print-paths`` of the profiler and of main.py), and which layers the autotuner serves."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

import torch.nn as nn

from .layer import PEDConv2d
from .selection import STATIC_REFERENCE

__all__ = ["auto_path_layers", "format_path_report", "has_auto_paths", "path_report", "reset_path_report"]


def auto_path_layers(model: nn.Module) -> List[PEDConv2d]:
    """The PEDConv layers of ``model`` with ``path=auto`` (the ones the autotuner serves)."""
    return [m for m in model.modules() if isinstance(m, PEDConv2d) and m.path == "auto"]


def has_auto_paths(model: nn.Module) -> bool:
    """Whether ``model`` has a PEDConv layer with ``path=auto`` (one the autotuner serves)."""
    return bool(auto_path_layers(model))


def reset_path_report(model: nn.Module) -> None:
    """Forget the paths logged so far by the PEDConv layers of ``model`` (the autotuner cache stays)."""
    for module in model.modules():
        if isinstance(module, PEDConv2d):
            module.forget_paths()


def path_report(model: nn.Module) -> List[Dict[str, Any]]:
    """One row per (PEDConv layer, input shape, forward-only or forward+backward) seen so far.

    Row keys: ``layer`` (module name), ``input`` (B x C x H x W), ``mode`` (``train`` when a backward
    followed, else ``eval``), ``path``, ``source`` (tuned / broadcast / loaded / only (one path
    applies) / heuristic / explicit) and ``times_ms`` (the autotuner's measurements, ms per call, when it
    timed the key).
    """
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, PEDConv2d):
            for (shape, grad), entry in module.logged_paths().items():
                rows.append({"layer": name or type(module).__name__, "input": "x".join(str(s) for s in shape),
                             "mode": "train" if grad else "eval", **entry})
    return rows


def format_path_report(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows of :func:`path_report` as a text table: times in ms (the chosen path marked with *), the
    chosen path's time as a multiple of nn.Conv2d's (``static``, timed alongside by the autotuner)."""
    if not rows:
        return "no PEDConv layer has run yet"
    head = f"{'layer':34} {'input':18} {'mode':5} {'path':12} {'source':10} {'x static':>8}  timings (ms)"
    lines = [head, "-" * len(head)]
    for r in rows:
        times = r.get("times_ms", {})
        timings = "  ".join(f"{'*' if k == r['path'] else ''}{k} {v:.2f}" for k, v in sorted(
            times.items(), key=lambda kv: kv[1]))
        ratio = f"{times[r['path']] / times[STATIC_REFERENCE]:8.2f}" if (
            r["path"] in times and times.get(STATIC_REFERENCE)) else f"{'-':>8}"
        lines.append(f"{r['layer']:34} {r['input']:18} {r['mode']:5} {r['path']:12} {r['source']:10} "
                     f"{ratio}  {timings}")
    return "\n".join(lines)


