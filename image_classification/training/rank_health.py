"""Naming the rank at fault when a multi-process run loses one: failed, killed or frozen.

A collective that loses a peer ends, on the surviving ranks, in a backend error that says nothing useful
("Connection closed by peer [10.0.0.2]:41234", or a timeout after ``--dist-timeout``). To say *which* rank
and *why*, every rank keeps two things in the rendezvous store (the TCPStore at ``MASTER_ADDR:MASTER_PORT``
that torchrun or rank 0 hosts):

* a heartbeat: a counter a daemon thread increments every ``interval`` seconds. A rank killed (SIGKILL,
  out-of-memory killer) or frozen (SIGSTOP, a hung filesystem, a deadlock holding the GIL) stops counting;
  a rank blocked in a collective keeps counting (the backends release the GIL while they wait);
* its outcome: the one-line error and exit status of a rank that fails on its own (bad image in its
  shard, ...), or a marker that it is exiting because it lost a peer.

:meth:`PeerMonitor.diagnose` (called by a rank whose collective failed) reads the counters twice,
``2.5 x interval`` apart, and the outcomes, and names the ranks at fault. Counters make it independent of
the nodes' clocks. Everything here is best effort: if the store itself is unreachable, the diagnosis says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, List, Optional, Tuple

__all__ = ["PeerMonitor", "PeerFailure", "is_peer_failure"]

_LOG = logging.getLogger(__name__)

# backend messages of a collective that lost its peers (gloo, NCCL): a plain RuntimeError elsewhere (a bug)
# keeps its traceback
_PEER_FAILURE_MARKERS = (
    "third_party/gloo", "connection closed by peer", "connection reset by peer", "broken pipe",
    "timed out waiting", "collective operation timeout", "ncclremoteerror", "nccl communicator was aborted",
    "failed to recv", "failed to send", "timeout caused pair closure",
)


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` looks like a collective that failed because a peer died or stalled."""
    if not isinstance(exc, RuntimeError):
        return False
    if type(exc).__name__ == "DistBackendError":
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _PEER_FAILURE_MARKERS)


@dataclass
class PeerFailure:
    """What :meth:`PeerMonitor.diagnose` found: a one-line message, the exit status to use, the lost ranks."""

    message: str
    exit_code: int
    lost: List[int]


class PeerMonitor:
    """Heartbeat and outcome of this rank in the rendezvous store, and the diagnosis of lost peers."""

    def __init__(self, rank: int, world_size: int, interval: Optional[float] = None, host: Optional[str] = None,
                 port: Optional[int] = None) -> None:
        # one store update per rank per second, fewer beyond 256 ranks (the store serves them all)
        self.interval = float(interval) if interval is not None else max(1.0, world_size / 256)
        self.rank, self.world_size = rank, world_size
        self.host = host or os.environ.get("MASTER_ADDR", "127.0.0.1")
        self.port = int(port if port is not None else os.environ.get("MASTER_PORT", "0"))
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"main.py-peers/{run_id}/{restart}/"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._store = None  # main-thread client; the heartbeat thread has its own connection

    # ---------------------------------------------------------------------------------------- store
    def _connect(self):
        import torch.distributed as dist

        return dist.TCPStore(self.host, self.port, is_master=False,
                             timeout=timedelta(seconds=max(5.0, 3 * self.interval)), wait_for_workers=False)

    def _client(self):
        if self._store is None:
            self._store = self._connect()
        return self._store

    def start(self) -> PeerMonitor:
        """Start the heartbeat (a daemon thread); a store that cannot be reached disables the monitor."""
        if self.world_size < 2 or self.port <= 0:
            return self
        try:
            beat_store = self._connect()
            beat_store.add(self._key("beat", self.rank), 1)
        except Exception as exc:  # noqa: BLE001 - diagnosis is best effort; training must not depend on it
            _LOG.warning("rank %d: peer monitor disabled, store %s:%s unreachable (%s); a lost rank will not be "
                         "named", self.rank, self.host, self.port, " ".join(str(exc).split())[:160])
            return self
        self._thread = threading.Thread(target=self._beat, args=(beat_store,), name="peer-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _key(self, kind: str, rank: int) -> str:
        return f"{self.prefix}{kind}/{rank}"

    def _beat(self, store) -> None:
        key = self._key("beat", self.rank)
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                store.add(key, 1)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval + 1)
            self._thread = None

    @property
    def active(self) -> bool:
        return self._thread is not None

    # ------------------------------------------------------------------------------------- outcomes
    def post_error(self, message: str, exit_code: int) -> None:
        """Record this rank's own failure (one line) so that the peers can name it."""
        if self.active:
            with contextlib.suppress(Exception):
                self._client().set(self._key("error", self.rank), f"{int(exit_code)} {message}")

    def post_lost_peer(self) -> None:
        """Record that this rank exits because it lost a peer (so it is not taken for the culprit)."""
        if self.active:
            with contextlib.suppress(Exception):
                self._client().set(self._key("lost", self.rank), "1")

    def _read(self, store, kind: str, rank: int) -> Optional[str]:
        key = self._key(kind, rank)
        if not store.check([key]):
            return None
        return store.get(key).decode("utf-8", "replace")

    def _beats(self, store) -> Dict[int, int]:
        return {r: int(store.add(self._key("beat", r), 0)) for r in range(self.world_size) if r != self.rank}

    # ------------------------------------------------------------------------------------ diagnosis
    def diagnose(self, exc: BaseException, timeout_s: Optional[float] = None) -> PeerFailure:
        """Name the ranks that failed (with their own error), or stopped responding, after ``exc``.

        A rank diagnoses only when its collective failed and it is about to leave for that reason, so it first
        records so (:meth:`post_lost_peer`): a rank diagnosing later must not take its ended heartbeat for a
        rank that stopped responding. Takes about ``2.5 x interval`` seconds; SIGTERM/SIGINT are held off
        meanwhile (torchrun's agent sends SIGTERM to the survivors as soon as one worker dies).
        """
        self.post_lost_peer()
        detail = " ".join(str(exc).split())
        timed_out = "timed out" in detail.lower() or "timeout" in detail.lower()
        suffix = f"; gave up after --dist-timeout {timeout_s:g} s" if timed_out and timeout_s else ""
        with _signals_held():
            try:
                failed, stalled = self._find_culprits()
            except Exception as error:  # noqa: BLE001 - the store went away with its host
                reason = " ".join(str(error).split())[:120]
                return PeerFailure(
                    f"lost contact with the other ranks and with the rendezvous store at {self.host}:{self.port} "
                    f"(the rank or launcher hosting it died?; {reason}){suffix}", 1, [])
        parts, code = [], 1
        for rank, (peer_code, message) in sorted(failed.items()):
            parts.append(f"rank {rank} failed: {message}")
            code = peer_code if code == 1 else code
        if stalled:
            which = ", ".join(map(str, stalled))
            parts.append(f"rank{'s' if len(stalled) > 1 else ''} {which} stopped responding (killed, frozen or "
                         f"out of memory: no heartbeat for {2.5 * self.interval:g} s)")
        if not parts:
            short = detail if len(detail) <= 160 else detail[:157] + "..."
            parts.append(f"lost contact with the other ranks ({short})")
        return PeerFailure("; ".join(parts) + suffix, code, sorted(set(failed) | set(stalled)))

    def _find_culprits(self) -> Tuple[Dict[int, Tuple[int, str]], List[int]]:
        store = self._client()
        before = self._beats(store)
        time.sleep(2.5 * self.interval)
        after = self._beats(store)
        failed: Dict[int, Tuple[int, str]] = {}
        stalled = []
        for rank in before:
            posted = self._read(store, "error", rank)
            if posted is not None:
                code_text, _, message = posted.partition(" ")
                failed[rank] = (int(code_text) if code_text.isdigit() else 1, message)
            elif after[rank] == before[rank] and self._read(store, "lost", rank) is None:
                stalled.append(rank)
        return failed, stalled


@contextlib.contextmanager
def _signals_held():
    """Ignore SIGTERM/SIGINT for the duration (main thread only), then restore the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError, OSError):
            previous[signum] = signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(signum, handler)
