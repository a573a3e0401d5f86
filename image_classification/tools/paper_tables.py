"""``python -m image_classification.tools.paper_tables [--table T] [--json]``: the papers' parameter and MAC
tables next to this project's counts (the rows and the counting: :mod:`image_classification.measurement.paper_tables`).
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

from image_classification.argparsing import ArgumentParser, run_program
from image_classification.measurement.paper_tables import (
    dense_table_rows,
    format_dense_table,
    format_table,
    table_rows,
)

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m image_classification.tools.paper_tables [--table T] [--json]``: the profiler's ``--table``."""
    parser = ArgumentParser(prog="python -m image_classification.tools.paper_tables",
                            description="The papers' parameter and MAC tables next to this project's counts (the same "
                            "as python -m image_classification.tools.profiler --table T).")
    parser.add_argument("--table", choices=("pedconv", "dcd", "odconv", "all", "dense"), default="all",
                        help="which tables (default: all classification tables; dense: PEDConv Tables 2-3)")
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    args = parser.parse_args(argv)
    rows = dense_table_rows() if args.table == "dense" else table_rows(args.table)
    text = format_dense_table(rows) if args.table == "dense" else format_table(rows)
    print(json.dumps(rows, indent=1) if args.json else text)
    return 0


if __name__ == "__main__":
    run_program(main)
