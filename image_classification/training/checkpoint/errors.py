"""What every checkpoint and workspace operation shares: :class:`CheckpointError` (a one-line message naming
the problem), the one-line formatting of foreign error text, and the path type the checkpoint modules accept."""

from __future__ import annotations

import os
from typing import Union

__all__ = ["CheckpointError", "PathLike", "one_line"]

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A checkpoint cannot be written, read or applied; the message is one line naming the problem."""


def one_line(text: object, limit: int = 240) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."

