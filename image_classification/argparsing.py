"""The argument parser of every command-line program here: bad input is one line, not a usage block.

argparse prints the whole usage (about 30 lines for ``main.py``) before its ``error:`` line, so the line that
matters scrolls away; here an error is ``PROG: error: MESSAGE (see --help)`` on stderr and exit status 2, the
status argparse uses.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = ["ArgumentParser"]


class ArgumentParser(argparse.ArgumentParser):
    """:class:`argparse.ArgumentParser` whose :meth:`error` prints one line and exits with status 2."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(str(message).split())
        sys.stderr.write(f"{self.prog}: error: {text} (see --help)\n")
        sys.stderr.flush()
        raise SystemExit(2)
