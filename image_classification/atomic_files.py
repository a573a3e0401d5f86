"""Files that appear whole or not at all, with the permissions of an ordinary new file.

Every result this project writes (checkpoints, exported models, JSON reports, the PEDConv path cache, analysis
CSV/PNG) goes to a temporary file next to its target and is renamed over it only when complete, so a crash, a full
disk or a signal never leaves a half-written file where a finished one was. ``tempfile.mkstemp`` creates its file
0600; the temporary is given the mode ``open()`` would give a new file under the process umask instead, so results
on a shared cluster stay readable by the group as any other file would be.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

__all__ = ["new_file_mode", "temporary_sibling", "replaced_atomically", "write_json_atomic"]

PathLike = Union[str, "os.PathLike[str]"]


def new_file_mode() -> int:
    """The mode ``open()`` gives new files under the process umask, read now (Linux: from /proc, which leaves the
    umask alone; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def temporary_sibling(target: PathLike, tag: str = "") -> Iterator[Path]:
    """Yield a fresh, empty temporary path next to ``target`` (``.<name>.<tag><random>.tmp``, mode as
    :func:`new_file_mode`); it is removed unless the block renamed it away."""
    target = Path(target)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{tag}", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode())
    except OSError:  # pragma: no cover - file systems without permissions
        pass
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def replaced_atomically(target: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``target``'s new content to; it replaces ``target`` when the block ends
    without an exception (else it is removed and ``target`` is untouched)."""
    with temporary_sibling(target) as tmp:
        yield tmp
        os.replace(tmp, target)


def write_json_atomic(path: PathLike, obj: Any, indent: Union[int, None] = 1) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename (never a half-written file)."""
    with replaced_atomically(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, indent=indent, default=str)
