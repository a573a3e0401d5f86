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

import sys
from pathlib import Path
from typing import List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from image_classification.argparsing import ArgumentParser, run_program  # noqa: E402
from image_classification.reporting.raport import PREFIX, read_raport  # noqa: E402
from image_classification.reporting.run_summary import RunSummary, markdown_table, summarize, write_csv  # noqa: E402

__all__ = ["RunSummary", "find_raports", "main", "markdown_table", "read_raport", "summarize", "write_csv"]


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
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
    run_program(main)
