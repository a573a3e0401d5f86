"""The run's workspace: one writability check, the workspace lock, the files an earlier run left.

* :func:`directory_write_problem` says why a file cannot be created in a directory, by creating and removing
  one (exact where ``os.access`` is not: root, ACLs, read-only mounts); ``main.py``'s argument validation
  and :func:`check_workspace_writable` both use it.
* :class:`WorkspaceLock` keeps a second run out of a workspace in use.
* :func:`existing_run_files` lists what a new run would replace.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path
from typing import List, Optional

from .errors import CheckpointError, PathLike
from .save import BEST_FILENAME, numbered_copies

__all__ = [
    "LOCK_FILENAME",
    "WorkspaceLock",
    "check_workspace_writable",
    "directory_write_problem",
    "existing_run_files",
    "nearest_existing_directory",
]


def nearest_existing_directory(path: PathLike) -> Path:
    """``path`` made absolute, or its nearest ancestor that exists (what creating ``path`` would write into)."""
    current = Path(os.path.abspath(Path(path).expanduser()))
    while not current.exists() and current.parent != current:
        current = current.parent
    return current


def directory_write_problem(directory: PathLike) -> Optional[str]:
    """Why a file cannot be created in ``directory``, in words, or None when it can.

    Tested by creating and removing a temporary file, which is exact where ``os.access`` is not (root,
    ACLs, read-only mounts). Nothing is left behind.
    """
    if not os.path.isdir(directory):
        return "not a directory"
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test-", suffix=".tmp")
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(probe)
    return None


def check_workspace_writable(path: PathLike) -> Path:
    """Create ``path`` (and parents) if needed and check a file can be created in it.

    Writability is tested by :func:`directory_write_problem`. Raises :class:`CheckpointError`.
    """
    workspace = Path(path).expanduser()
    if workspace.exists() and not workspace.is_dir():
        raise CheckpointError(f"workspace {workspace} exists and is not a directory")
    try:
        workspace.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"workspace {workspace} cannot be created: {exc.strerror or exc}") from None
    problem = directory_write_problem(workspace)
    if problem is not None:
        raise CheckpointError(f"workspace {workspace} is not writable: {problem}")
    return workspace


LOCK_FILENAME = ".main.lock"


class WorkspaceLock:
    """An exclusive lock on a workspace for the lifetime of a run (``fcntl.flock`` on ``.main.lock``).

    A second run in the same workspace is refused with a :class:`CheckpointError` naming the holder (pid and
    host written in the lock file). The kernel releases the lock when its process ends in any way (SIGKILL
    included), so a dead run never leaves a stale lock (only an unlocked file, which the next run takes
    over); a clean exit removes the file. A no-op where ``fcntl`` is missing (Windows).
    """

    def __init__(self, workspace: PathLike) -> None:
        self.path = Path(workspace).expanduser() / LOCK_FILENAME
        self._fd: Optional[int] = None

    def acquire(self) -> WorkspaceLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        for _ in range(100):  # retried only while a releasing holder unlinks the file under us
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise CheckpointError(f"cannot create the workspace lock {self.path}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                raise CheckpointError(
                    f"workspace {self.path.parent} is in use by another run ({holder}); wait for it to end or use "
                    "another --workspace"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # we locked a file its previous holder had just removed: lock the new one
        else:  # pragma: no cover - a pathological race
            raise CheckpointError(f"cannot lock the workspace {self.path.parent}")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and release the lock (in this order: a waiting run re-checks the inode)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkspaceLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def existing_run_files(workspace: PathLike, filename: str, raport: Optional[PathLike] = None) -> List[str]:
    """Names of the files of an earlier run in ``workspace`` that a new run would replace (checkpoint,
    best model, per-epoch copies, non-empty raport)."""
    directory = Path(workspace).expanduser()
    if not directory.is_dir():
        return []
    found = [name for name in (filename, BEST_FILENAME) if (directory / name).is_file()]
    found += [path.name for _, path in numbered_copies(directory, filename)]
    if raport is not None:
        raport_path = Path(raport)
        with contextlib.suppress(OSError):
            if raport_path.is_file() and raport_path.stat().st_size > 0:
                found.append(os.path.relpath(raport_path, directory) if raport_path.is_absolute() else raport_path.name)
    return found
