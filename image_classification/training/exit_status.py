"""The exit statuses of the training programs (``main.py`` and the dense tasks' ``train_detection`` /
``train_segmentation``) and the one policy that maps a failure to its status and its one line, so the same failure
ends the same way in every loop.

==========  =====================================================================================================
status      meaning
==========  =====================================================================================================
0           done
1           an unexpected error (its traceback follows), or a lost peer rank that left no status of its own
2           bad input: data, checkpoint, options, an allocation the machine cannot serve, a raport the disk cannot
            take; one line on stderr, nothing on disk lost
3           the run diverged (a non-finite loss); the last checkpoint is kept
128 + N     stopped by signal N after saving a checkpoint (143: SIGTERM, 130: SIGINT)
==========  =====================================================================================================
"""

from __future__ import annotations

import contextlib
import re
import signal
from dataclasses import dataclass
from typing import Iterator, Optional

from image_classification.compat import OUT_OF_MEMORY_ERRORS
from image_classification.data import DataError, worker_failure

from .checkpoint import CheckpointError
from .engine import NonFiniteLossError
from .logger import RaportError

__all__ = ["EXIT_BAD_INPUT", "EXIT_DIVERGED", "EXIT_FAILED", "EXIT_OK", "Failure", "UsageError", "error_line",
           "expected_failure", "out_of_memory", "signal_status", "usage_errors"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_DIVERGED = 0, 1, 2, 3


def signal_status(signum: Optional[int]) -> int:
    """The status of a run stopped by signal ``signum`` (the shell's 128 + N; SIGTERM's when it is not known)."""
    return 128 + int(signum or signal.SIGTERM)


class UsageError(ValueError):
    """A bad combination of options found while building the run (one-line message, exit status 2)."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(" ".join(str(exc).split()))


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """A ``ValueError`` raised inside is a bad combination of options: re-raised as :class:`UsageError`."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(exc) from None


@dataclass(frozen=True)
class Failure:
    """An expected failure: the status to exit with and the one line that says it."""

    status: int
    message: str


def out_of_memory(exc: BaseException) -> Optional[str]:
    """The one-line remedy for an allocation the machine (or GPU) cannot serve, or None for another error."""
    text = " ".join(str(exc).split())
    if not (isinstance(exc, OUT_OF_MEMORY_ERRORS) or "can't allocate memory" in text
            or "out of memory" in text.lower()):
        return None
    asked = re.search(r"allocate (\d+) bytes", text)
    size = f"{int(asked.group(1)) / 2**30:.1f} GiB" if asked else None
    if size is None:
        cuda = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]iB)", text)
        size = cuda.group(1) if cuda else "more memory than it has"
    device = "GPU" if "CUDA" in text or "cuda" in text else "machine"
    return (f"out of memory: the {device} cannot allocate {size} for this run; lower -b (images per process), "
            "--image-size or the model's size (or --amp on a GPU)")


def expected_failure(exc: BaseException, workers: Optional[int] = None) -> Optional[Failure]:
    """The status and one line of a failure the programs expect, or None for an unexpected one (a bug: let its
    traceback through). ``workers``: the loader's worker count, to name a worker that died."""
    if isinstance(exc, NonFiniteLossError):
        return Failure(EXIT_DIVERGED, " ".join(str(exc).split()))
    if isinstance(exc, (DataError, CheckpointError, UsageError, RaportError)):
        return Failure(EXIT_BAD_INPUT, " ".join(str(exc).split()))
    if isinstance(exc, RuntimeError):
        worker = worker_failure(exc, workers)  # raised by torch's SIGCHLD handler anywhere in a step
        if worker is not None:
            return Failure(EXIT_BAD_INPUT, " ".join(str(worker).split()))
        memory = out_of_memory(exc)
        if memory is not None:
            return Failure(EXIT_BAD_INPUT, memory)
    return None


def error_line(prog: str, message: str, rank: Optional[int] = None) -> str:
    """``prog: error: [rank N] message`` (the rank prefix on ranks other than 0)."""
    return f"{prog}: error: {f'[rank {rank}] ' if rank else ''}{message}"
