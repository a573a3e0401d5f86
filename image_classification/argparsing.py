"""The argument parser of every command-line program here: bad input is one line, not a usage block; and
:func:`run_program`, how a program's ``main`` becomes its exit status.

argparse prints the whole usage (about 30 lines for ``main.py``) before its ``error:`` line, so the line that
matters scrolls away; here an error is ``PROG: error: MESSAGE (see --help)`` on stderr and exit status 2, the
status argparse uses.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn

__all__ = ["ArgumentParser", "run_program"]


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
