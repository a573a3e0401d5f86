"""``main.py``'s entry point and exit policy: train or evaluate, in one process or under torchrun, and say
how it ended.

:func:`run` sets up the process group, hands the work to :class:`~.lifecycle.TrainingRun` (read and build,
then write and train) and turns each way of failing into one line on stderr and an exit status
(:mod:`.exit_status`): bad input 2 (nothing written: a run reads everything before it creates its
workspace), a diverged run 3, a signal 128 + its number (143 for SIGTERM, 130 for SIGINT; a checkpoint is
written first, so job schedulers see the run as interrupted, not finished), a lost peer rank its status.

Checkpoints hold ``epoch`` = completed epochs (plus ``step_in_epoch`` when a signal stopped an epoch
part-way); resuming restores weights, optimizer, scheduler, scaler, EMA, best top-1 and every RNG, and
the data order is a function of (seed, epoch), so an interrupted-and-resumed run equals an uninterrupted
one bit for bit on CPU with a fixed seed.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

from image_classification.data import DataError

from .checkpoint import CheckpointError
from .cli import parse_args
from .distributed import (
    DistEnv,
    RanksDisagree,
    check_same_arguments,
    cleanup,
    init_distributed,
    run_defining_arguments,
)
from .engine import NonFiniteLossError
from .exit_status import EXIT_BAD_INPUT, EXIT_DIVERGED, UsageError, error_line, expected_failure
from .lifecycle import TrainingRun
from .logger import RaportError
from .rank_health import PeerMonitor, is_peer_failure

__all__ = ["main", "run", "run_parsed"]


class PeerLost(Exception):
    """Raised by :func:`run` after it reported a lost peer rank; ``exit_code`` is the status to exit with."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"lost a peer rank (exit status {exit_code})")
        self.exit_code = exit_code


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``main.py``; returns the process exit status."""
    return run_parsed(parse_args(argv))


def run_parsed(args: argparse.Namespace) -> int:
    """:func:`main` on arguments already parsed by :func:`~.cli.parse_args`; returns the exit status."""
    status: Optional[int] = None
    try:
        status = run(args)
        return status
    except PeerLost as exc:
        # a process group that lost a peer can block in its destructors (seconds, or for ever with a frozen
        # peer): the message is out, the raport closed and the lock released, so leave at once
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.exit_code)
    finally:
        cleanup(all_ranks_here=status == 0)


def run(args: argparse.Namespace) -> int:
    """Train or evaluate as ``args`` say; returns the exit status.

    Expected failures end in one line on stderr: bad input (``DataError``, ``CheckpointError``, a bad
    combination of options) with status 2, a diverged run with 3. Under DDP a rank that fails on its own
    records its error for the others; a rank whose collective fails because a peer died, froze or failed
    names that rank (and its error) and raises :class:`PeerLost` with the peer's status (1 when it has
    none), on which :func:`main` exits without tearing down the broken process group.
    """
    if args.local_rank is not None:  # torch.distributed.launch passes --local-rank instead of the variable
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    env: Optional[DistEnv] = None
    monitor: Optional[PeerMonitor] = None
    try:
        try:
            env = init_distributed(args.device, timeout_s=args.dist_timeout)
        except ValueError as exc:
            raise UsageError(exc) from None
        if env.distributed:
            monitor = PeerMonitor(env.rank, env.world_size).start()
            check_same_arguments(run_defining_arguments(args), env.device)
        return TrainingRun.prepare(args, env).execute()
    except RanksDisagree as exc:  # every rank found it: rank 0 says it once
        code = _report(exc, EXIT_BAD_INPUT, env, None, quiet=env is not None and not env.is_main)
        _tear_down_together(monitor)
        return code
    except NonFiniteLossError as exc:  # all ranks see the same summed loss: rank 0 says it once
        code = _report(exc, EXIT_DIVERGED, env, None, quiet=env is not None and not env.is_main)
        _tear_down_together(monitor)
        return code
    except (DataError, CheckpointError, UsageError, RaportError, RuntimeError) as exc:
        failure = expected_failure(exc, args.workers)
        if failure is not None:
            return _report(failure.message, failure.status, env, monitor)
        if env is None or not env.distributed or monitor is None or not is_peer_failure(exc):
            _post_unexpected(exc, monitor)
            raise
        peer = monitor.diagnose(exc, args.dist_timeout)
        # the lowest-numbered rank that is still alive reports it (rank 0 unless rank 0 is the one lost); when
        # nobody could be named (the store went away with its host), every rank says what it saw
        alive = [r for r in range(env.world_size) if r not in peer.lost]
        if not peer.lost or env.rank == alive[0]:
            prefix = f"[rank {env.rank}] " if not peer.lost and not env.is_main else ""
            print(f"main.py: error: {prefix}{peer.message}", file=sys.stderr, flush=True)
        raise PeerLost(peer.exit_code) from None
    except BaseException as exc:
        _post_unexpected(exc, monitor)
        raise
    finally:
        if monitor is not None:
            monitor.stop()


def _tear_down_together(monitor: Optional[PeerMonitor]) -> None:
    """Every rank stopped at the same collective: stop the heartbeat, then destroy the process group together."""
    if monitor is not None:
        monitor.stop()
    cleanup(all_ranks_here=True)


def _report(message: Any, code: int, env: Optional[DistEnv], monitor: Optional[PeerMonitor],
            quiet: bool = False) -> int:
    """One line on stderr (``[rank N]`` on ranks but 0), the error recorded for the peers; the exit status."""
    if not quiet:
        rank = env.rank if env is not None and env.distributed else None
        print(error_line("main.py", str(message), rank), file=sys.stderr, flush=True)
    if monitor is not None:
        monitor.post_error(str(message), code)
    return code


def _post_unexpected(exc: BaseException, monitor: Optional[PeerMonitor]) -> None:
    if monitor is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
        text = " ".join(str(exc).split())
        monitor.post_error(f"{type(exc).__name__}: {text[:300]} (see its traceback)", 1)
