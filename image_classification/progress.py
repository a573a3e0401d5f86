"""Console progress of the long measurements (profiler, benchmark, count tables): nothing sits silent.

On a terminal a tqdm bar on stderr; elsewhere (a log file, CI) plain lines on stderr: one when the work starts
(what and how many), one at most every ``every_s`` seconds while it runs, one when it ends (how long it took).
Standard output stays free for the results (tables, JSON).
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

__all__ = ["progress"]

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: Optional[int] = None, unit: str = "step",
             every_s: float = 30.0, use_tqdm: Optional[bool] = None) -> Iterator[T]:
    """Yield ``items`` while showing how far they got (``total`` defaults to ``len(items)`` where it has one)."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]  # hasattr narrows nothing for mypy
    if use_tqdm if use_tqdm is not None else sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
        return
    of = f"/{total}" if total is not None else ""
    print(f"{desc}: {total if total is not None else 'some'} {unit}(s) ...", file=sys.stderr, flush=True)
    started = last = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= every_s:
            print(f"{desc}: {done}{of} {unit}(s) after {now - started:.0f} s", file=sys.stderr, flush=True)
            last = now
    print(f"{desc}: done ({done} {unit}(s), {time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
