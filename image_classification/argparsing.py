"""The argument parser of every command-line program here: bad input is one line, not a usage block; the argument
types that check a value where it is read (``type=positive_int`` ...), so no program re-checks ">= 1" by hand; and
:func:`run_program`, how a program's ``main`` becomes its exit status.

argparse prints the whole usage (about 30 lines for ``main.py``) before its ``error:`` line, so the line that
matters scrolls away; here an error is ``PROG: error: MESSAGE (see --help)`` on stderr and exit status 2, the
status argparse uses.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, NoReturn

__all__ = ["ArgumentParser", "finite_float", "integer", "non_negative_float", "non_negative_int", "positive_float",
           "positive_int", "probability", "run_program"]


class ArgumentParser(argparse.ArgumentParser):
    """:class:`argparse.ArgumentParser` whose :meth:`error` prints one line and exits with status 2."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(str(message).split())
        sys.stderr.write(f"{self.prog}: error: {text} (see --help)\n")
        sys.stderr.flush()
        raise SystemExit(2)


def run_program(main: Callable[[], int]) -> NoReturn:
    """Exit with ``main()``'s status. A reader that stops early (``... | head``) closes the pipe: the program then
    stops quietly with 141 (128 + SIGPIPE, as a shell reports a writer the pipe stopped) instead of a
    BrokenPipeError traceback, here or when Python flushes stdout at exit."""
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # stdout to /dev/null: the interpreter's final flush must not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(141) from None
    raise SystemExit(status)


# ------------------------------------------------------------------------------ argument types (type=...)
def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def probability(text: str) -> float:
    """A number in [0, 1) (dropout, momentum-like rates)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value
