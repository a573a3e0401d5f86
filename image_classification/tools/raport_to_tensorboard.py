"""Existing raports (DLLogger JSON lines, ``raport.json``) as TensorBoard event files, with the same tags and steps
``main.py --tensorboard`` writes live (:mod:`image_classification.reporting.tensorboard`), so runs made without the
flag, or on another machine, are viewed alongside. Usage::

    python -m image_classification.tools.raport_to_tensorboard \\
        logs/r18_static/raport.json logs/r18_pedconv/raport.json --out logs/tensorboard
    tensorboard --logdir logs/tensorboard

Each raport goes to ``OUT/<name>``, the name of the folder holding it (``r18_static``, ``r18_pedconv``) unless
``--names`` gives them. An iteration record's global step is ``epoch * iterations_per_epoch + iteration``, the
epoch length being the largest iteration number the raport logs (``--iterations-per-epoch`` overrides it).
A target folder that already holds event files is refused (TensorBoard would show both).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from image_classification.argparsing import ArgumentParser, positive_int, run_program
from image_classification.reporting.raport import read_raport
from image_classification.reporting.tensorboard import TensorBoardScalars, iterations_per_epoch, require_tensorboard

PROG = "python -m image_classification.tools.raport_to_tensorboard"


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("raports", nargs="+", metavar="RAPORT", help="raport files (main.py's raport.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="TensorBoard log directory (one folder per raport)")
    p.add_argument("--names", nargs="+", default=None, metavar="NAME",
                   help="the runs' folder names under --out, one per raport (default: each raport's folder name, "
                        "with as many parent folders as it takes to tell them apart: static-seed0)")
    p.add_argument("--iterations-per-epoch", type=positive_int, default=None, metavar="N",
                   help="epoch length for the global iteration step (default: the largest iteration a raport logs)")
    return p


def _checked_records(raport: Path) -> list:
    """The raport's LOG records; ValueError for a file without any (an empty or non-raport JSON converted 0 records
    with exit 0) and for a record whose step is not a list of integers or a name, naming the record."""
    records = []
    for number, record in enumerate(read_raport(raport), start=1):
        if not isinstance(record, dict) or record.get("type") != "LOG" or record.get("step") == []:
            continue
        step = record.get("step")
        if not isinstance(step, str) and not (isinstance(step, list) and all(
                isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()) for v in step)):
            raise ValueError(f"DLLL record {number} has step {step!r}: a raport step is a list of integers "
                             f"([epoch] or [epoch, iteration]) or a name")
        records.append(record)
    if not records:
        raise ValueError("no LOG records: not a raport main.py wrote (WORKSPACE/raport.json), or an empty one")
    return records


def convert(raport: Path, logdir: Path, per_epoch: Optional[int] = None) -> int:
    """Write ``raport``'s records to event files in ``logdir``; returns how many records were written. ValueError
    (nothing written) for a file without LOG records or with a malformed step."""
    records = _checked_records(raport)
    writer = TensorBoardScalars(logdir, per_epoch or iterations_per_epoch(records))
    count = 0
    try:
        for record in records:
            writer.log(record["step"], record.get("data", {}))
            count += 1
    finally:
        writer.close()
    return count


def default_names(raports: Sequence[Path]) -> List[str]:
    """One folder name per raport: its folder's name, or as many of its last folders joined by '-' as it takes to
    tell the raports apart (the study's ``static/seed0/raport.json`` and ``pedconv/seed0/raport.json`` ->
    ``static-seed0``, ``pedconv-seed0``)."""
    parts = [[p for p in r.resolve().parent.parts if p not in ("/", "")] or [r.stem] for r in raports]
    longest = max(len(p) for p in parts)
    for depth in range(1, longest + 1):
        names = ["-".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return ["-".join(p) for p in parts]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        require_tensorboard(PROG)
    except ImportError as exc:
        parser.error(str(exc))
    raports = [Path(r) for r in args.raports]
    for raport in raports:
        if not raport.is_file():
            parser.error(f"{raport}: no such raport file (main.py writes WORKSPACE/raport.json)")
    names: List[str] = args.names or default_names(raports)
    if len(names) != len(raports):
        parser.error(f"--names gives {len(names)} name(s) for {len(raports)} raport(s)")
    if len(set(names)) != len(names):  # the same raport twice, or --names repeating one
        parser.error(f"two raports would share one folder under --out ({', '.join(names)}); give --names")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file, not a directory")
    for name in names:
        target = out / name
        if target.is_dir() and any(p.name.startswith("events.out.tfevents") for p in target.iterdir()):
            parser.error(f"{target} already holds TensorBoard event files; choose another --out or remove them")
    for raport in raports:  # every raport checked before anything is written
        try:
            _checked_records(raport)
        except (OSError, ValueError) as exc:
            print(f"{PROG}: error: {raport}: {exc}", file=sys.stderr)
            return 2
    for raport, name in zip(raports, names):
        try:
            count = convert(raport, out / name, args.iterations_per_epoch)
        except (OSError, ValueError) as exc:
            print(f"{PROG}: error: {raport}: {exc}", file=sys.stderr)
            return 2
        print(f"[tensorboard] {raport} -> {out / name} ({count} records)", flush=True)
    print(f"[tensorboard] view with: tensorboard --logdir {os.fspath(out)}")
    return 0


if __name__ == "__main__":
    run_program(main)
