"""Graceful shutdown: :class:`GracefulShutdown` turns SIGTERM/SIGINT into a flag the trainer polls, so that
a preempted run saves a checkpoint and exits instead of dying mid-epoch."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch

__all__ = ["GracefulShutdown", "Interrupted"]


class Interrupted(BaseException):
    """A signal arrived where :meth:`GracefulShutdown.nothing_to_save` said waiting would gain nothing.

    A BaseException, as KeyboardInterrupt, so that no ``except Exception`` of a library (torch.compile's
    included) swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = int(signum)


#: the signals that ask for a save: SIGTERM and SIGINT, and SIGUSR1 where it exists, which SLURM sends to the tasks
#: themselves under ``--signal=USR1@N`` (without ``B:``; it killed main.py with 138 and no checkpoint). Only
#: scripts/slurm/train.sbatch's ``B:`` form also requeues the job.
DEFAULT_SIGNALS: Tuple[int, ...] = (signal.SIGTERM, signal.SIGINT,
                                     *((signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ()))


class GracefulShutdown:
    """Context manager turning SIGTERM/SIGINT into a flag the training loop polls.

    The first signal sets ``requested`` and records ``signum``; the trainer then saves a
    checkpoint and exits. A SIGTERM asks for that save however often it comes (SLURM signals every task at
    preemption, and a batch script may forward one more): each further one is a line on stderr, nothing else.
    Only a second SIGINT, a person's second Ctrl-C, gives up waiting: one line saying what is lost and the
    process exits at once with 128 + signum (``os._exit``: no traceback, nothing unwound; nothing is half-written
    outside a save, and the kernel releases the workspace lock). Inside :meth:`saving` it does not either: a
    checkpoint being written is finished first (cutting it would leave a partial temporary and no checkpoint).
    Previous handlers are restored on exit. Outside the main thread (where Python cannot install handlers) it
    installs nothing but stays usable: ``requested`` can still be set by :meth:`request`. ``program`` names the
    process in the lines it prints.
    """

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS, program: str = "main.py") -> None:
        self.signals = tuple(signals)
        self.program = program
        self._saving = 0
        self.immediate = False
        self.requested = False
        self.signum: Optional[int] = None
        self.active = False
        self._previous: Dict[int, Any] = {}
        self._exit_message: Optional[str] = None
        self._first_note: Optional[str] = None

    @property
    def signal_name(self) -> Optional[str]:
        """The name of the signal received (``"SIGTERM"``), or None."""
        if self.signum is None:
            return None
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return str(self.signum)

    def request(self, signum: Optional[int] = None) -> None:
        """Mark a shutdown as requested (what the handler does on the first signal)."""
        self.requested = True
        if self.signum is None:
            self.signum = signum

    @contextlib.contextmanager
    def nothing_to_save(self, exit_message: Optional[str] = None) -> Iterator[None]:
        """A stretch of work whose interruption loses nothing (e.g. torch.compile tracing before the first step):
        a signal inside it stops the process at once instead of waiting for the next iteration.

        ``exit_message`` None: the signal raises :class:`Interrupted` where the handler runs. A string (``{signal}``
        is replaced by the signal's name; empty: nothing printed): the handler prints it on stderr and leaves with
        ``os._exit(128 + signum)``, unwinding nothing. Use that around foreign code such as torch.compile, where an
        exception raised by a signal handler can cross a C++ frame that cannot pass it on (``terminate called after
        throwing an instance of 'python_error'``, an abort instead of the exit status). A signal that arrived
        before the block raises :class:`Interrupted` on entry, either way."""
        self.immediate = True
        self._exit_message = exit_message
        try:
            if self.requested:
                raise Interrupted(self.signum or signal.SIGTERM)
            yield
        finally:
            self.immediate = False
            self._exit_message = None

    @contextlib.contextmanager
    def announcing(self, note: str) -> Iterator[None]:
        """A stretch that a stop request cannot cut short (validation, which is exact over the whole set): a first
        signal inside it prints ``note`` at once (``{signal}`` replaced by its name), so the wait is not silent."""
        previous, self._first_note = self._first_note, note
        try:
            yield
        finally:
            self._first_note = previous

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """A checkpoint write: signals inside it are noted (one line each) and acted on once it is complete."""
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1

    def _say(self, text: str) -> None:
        sys.stderr.write(f"{self.program}: {text}\n")
        with contextlib.suppress(Exception):
            sys.stderr.flush()

    def _handler(self, signum: int, frame: Any) -> None:
        if self.immediate:
            self.request(signum)
            if self._exit_message is not None:
                if self._exit_message:
                    sys.stderr.write(self._exit_message.replace("{signal}", self.signal_name or str(signum)) + "\n")
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                os._exit(128 + signum)
            raise Interrupted(signum)
        if not self.requested:
            self.request(signum)
            if self._first_note:
                self._say(self._first_note.replace("{signal}", self.signal_name or str(signum)))
            return
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        if self._saving:
            self._say(f"{name} again while the checkpoint is written: stopping once it is complete (SIGKILL stops "
                      "at once, losing it)")
            return
        if signum != signal.SIGINT:
            self._say(f"{name} again: still stopping after saving a checkpoint (a SIGTERM always asks for the save; "
                      "a second Ctrl-C or SIGKILL stops at once, losing the progress since the last checkpoint)")
            return
        self._say(f"second {name}: stopping now without saving (the last checkpoint on disk is intact; the "
                  "progress since it is lost)")
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(128 + signum)

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self.active = False

    def __enter__(self) -> GracefulShutdown:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handler)
            self.active = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def synchronized(self, device: Optional[torch.device] = None) -> bool:
        """``requested`` on any rank (all-reduced MAX when torch.distributed is initialized).

        Under torchrun every worker receives the signal, but not necessarily at the same
        iteration; checking this at a common point lets all ranks stop together. ``device`` must
        be the rank's CUDA device with the nccl backend.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
