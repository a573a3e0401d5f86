"""Atomic checkpoint writing: a crash or a full disk at any moment leaves the previous files intact.

:func:`save_checkpoint` serializes once to a temporary file in the workspace, fsyncs it and renames it over
``checkpoint.pth.tar``; ``model_best.pth.tar`` and the per-epoch copies kept by ``--gather-checkpoints``
are copies of that finished file, each renamed into place, so no partial file is ever left behind.
Everything saved is rebuilt first from types that ``torch.load(weights_only=True)`` accepts.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import logging
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Any, ContextManager, Dict, List, Mapping, Optional, Tuple

import torch

from image_classification.atomic_files import temporary_sibling

from .errors import CheckpointError, PathLike, one_line

try:  # numpy is optional: torch runs without it
    import numpy as np
except ImportError:  # pragma: no cover - exercised only where numpy is absent
    np = None  # type: ignore[assignment]  # numpy is optional

__all__ = ["BEST_FILENAME", "numbered_copies", "remove_temporaries", "save_checkpoint"]

BEST_FILENAME = "model_best.pth.tar"
_LOG = logging.getLogger(__name__)

_SAFE_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def _weights_only_safe(obj: Any, where: str) -> Any:
    """Return ``obj`` rebuilt from types ``torch.load(weights_only=True)`` accepts.

    Tensors are passed through untouched (no copy); numpy scalars become python numbers, numpy
    arrays tensors, ``argparse.Namespace`` a dict, paths strings, other mappings dicts and tuple
    subclasses (named tuples) plain tuples. Anything else is refused here, at save time, rather
    than making the checkpoint unloadable later.
    """
    if isinstance(obj, torch.Tensor) or type(obj) in _SAFE_LEAVES:
        return obj
    if isinstance(obj, collections.OrderedDict):
        rebuilt = collections.OrderedDict((k, _weights_only_safe(v, f"{where}[{k!r}]")) for k, v in obj.items())
        metadata = getattr(obj, "_metadata", None)  # module versions kept by nn.Module.state_dict()
        if metadata is not None:
            rebuilt._metadata = _weights_only_safe(metadata, f"{where}._metadata")  # type: ignore[attr-defined]  # state_dict's _metadata is set by nn.Module, not declared
        return rebuilt
    if isinstance(obj, Mapping):
        return {k: _weights_only_safe(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, argparse.Namespace):
        return _weights_only_safe(vars(obj), where)
    if isinstance(obj, (list, tuple)):
        items = [_weights_only_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (bool, int, float, str)):  # subclasses such as IntEnum / str Enum
        return _builtin_value(obj)
    if np is not None:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(obj).copy())
    raise CheckpointError(
        f"cannot save {where}: {type(obj).__module__}.{type(obj).__qualname__} is not a tensor, number, "
        "string or container, and torch.load(weights_only=True) would refuse it"
    )


def _builtin_value(obj: Any) -> Any:
    for base in (bool, int, float, str):
        if isinstance(obj, base):
            return base(obj)
    return obj  # pragma: no cover - callers pass only the types above


def _fsync_dir(directory: Path) -> None:
    """Make renames in ``directory`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a directory; the rename itself is done
        _LOG.debug("cannot fsync directory %s: %s", directory, exc.strerror or exc)
    finally:
        os.close(fd)


def _temporary_sibling(target: Path) -> ContextManager[Path]:
    """A temporary next to ``target`` whose name carries the writer's pid (``.<name>.pid<PID>.<random>.tmp``: a
    later run removes a killed writer's), with an ordinary new file's permissions under the umask."""
    return temporary_sibling(target, tag=f"pid{os.getpid()}.")


def _write_atomic(state: Dict[str, Any], target: Path) -> None:
    with _temporary_sibling(target) as tmp:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)


def _copy_atomic(source: Path, target: Path) -> None:
    with _temporary_sibling(target) as tmp:
        shutil.copyfile(source, tmp)  # sendfile on Linux: no second serialization, no Python loop
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)


def _split_suffix(filename: str) -> Tuple[str, str]:
    for suffix in (".pth.tar", ".pth", ".pt", ".tar"):
        if filename.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)], suffix
    return filename, ""


def numbered_copies(workspace: Path, filename: str) -> List[Tuple[int, Path]]:
    stem, suffix = _split_suffix(filename)
    pattern = re.compile(rf"{re.escape(stem)}-(\d{{4,}}){re.escape(suffix)}")
    found = []
    for entry in workspace.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _temporary_pattern(filename: str) -> re.Pattern:
    stem, suffix = _split_suffix(filename)
    owned = rf"(?:{re.escape(filename)}|{re.escape(BEST_FILENAME)}|{re.escape(stem)}-\d{{4,}}{re.escape(suffix)})"
    return re.compile(rf"\.{owned}\.(?:pid\d+\.)?[A-Za-z0-9_]+\.tmp")


def _remove_stale_temporaries(directory: Path, filename: str, max_age_s: float = 3600.0) -> None:
    """Delete temporaries of our own files left by a writer that was killed (SIGKILL, OOM, power loss).

    Only names this module creates are touched, and only when older than ``max_age_s``, so a save
    in progress elsewhere (a second run wrongly sharing the workspace) is never disturbed.
    """
    pattern = _temporary_pattern(filename)
    now = time.time()
    for entry in directory.iterdir():
        if pattern.fullmatch(entry.name):
            with contextlib.suppress(OSError):
                if now - entry.stat().st_mtime > max_age_s:
                    entry.unlink()


def remove_temporaries(workspace: PathLike, filename: str) -> List[str]:
    """Delete every temporary of our checkpoint files in ``workspace``, whatever its age; returns their names.

    Only for a process that holds the :class:`WorkspaceLock`: then no other writer exists, and every
    temporary is the leftover of a writer killed part-way (repeated preemption would otherwise fill the
    disk with full-size partial checkpoints).
    """
    directory = Path(workspace).expanduser()
    pattern = _temporary_pattern(filename)
    removed = []
    if directory.is_dir():
        for entry in directory.iterdir():
            if pattern.fullmatch(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed.append(entry.name)
    return removed


def _write_failure(exc: BaseException, directory: Path) -> str:
    """Why a write failed, in words: torch's zip writer reports a full disk as "enforce fail ...
    unexpected pos", so a full (or quota-exhausted) filesystem is recognised from its free space."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{exc.strerror} ({_free_space(directory)})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    message = str(exc)
    if isinstance(exc, RuntimeError) and ("unexpected pos" in message or "file write failed" in message):
        try:
            free = shutil.disk_usage(directory).free
        except OSError:
            free = None
        if free is not None and free < 64 * 2**20:
            return f"No space left on device ({_free_space(directory)})"
        return f"the write failed part-way (disk full, quota or I/O error?; {_free_space(directory)})"
    return one_line(message)


def _free_space(directory: Path) -> str:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return "free space unknown"
    return f"{free / 2**20:.1f} MiB free in {directory} once the partial file is removed"


def save_checkpoint(
    state: Dict[str, Any],
    workspace: PathLike,
    filename: str = "checkpoint.pth.tar",
    is_best: bool = False,
    gather: int = 0,
) -> Path:
    """Atomically write ``state`` to ``workspace/filename`` and return that path.

    The state is serialized once: ``torch.save`` into a temporary file in the same directory,
    flush + ``os.fsync``, then ``os.replace`` over the target. With ``is_best`` the finished file
    is copied to ``model_best.pth.tar`` through the same temp-and-rename; with ``gather > 0`` a
    per-epoch copy ``<stem>-{epoch:04d}<suffix>`` (``checkpoint-0007.pth.tar`` by default, epoch
    from ``state["epoch"]``) is kept and gathered copies of earlier epochs beyond the last
    ``gather`` are deleted (copies of later epochs, left by a run resumed from an earlier point,
    are left alone). On any failure the previous files are untouched, no temporary file remains,
    and a :class:`CheckpointError` names the file (KeyboardInterrupt and the like propagate as is).
    Temporaries left by a writer killed outright (SIGKILL) are removed by a later save after an hour.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint state must be a dict, got {type(state).__name__}")
    if not isinstance(filename, str) or not filename or os.path.basename(filename) != filename:
        raise CheckpointError(f"checkpoint filename must be a plain file name, got {filename!r}")
    if filename == BEST_FILENAME:
        raise CheckpointError(f"checkpoint filename {filename!r} is reserved for the best model")
    if isinstance(gather, bool) or not isinstance(gather, int) or gather < 0:
        raise CheckpointError(f"gather must be a non-negative integer, got {gather!r}")
    epoch: Optional[int] = None
    if gather:
        raw_epoch = state.get("epoch")
        if isinstance(raw_epoch, bool) or not isinstance(raw_epoch, int) or raw_epoch < 0:
            raise CheckpointError(
                f"gathering checkpoints needs a non-negative integer state['epoch'], got {raw_epoch!r}"
            )
        epoch = raw_epoch

    safe_state = _weights_only_safe(dict(state), "state")
    directory = Path(workspace).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint workspace {directory} does not exist or is not a directory")
    target = directory / filename
    current = target
    _remove_stale_temporaries(directory, filename)
    try:
        _write_atomic(safe_state, target)
        if is_best:
            current = directory / BEST_FILENAME
            _copy_atomic(target, current)
        if epoch is not None:
            stem, suffix = _split_suffix(filename)
            current = directory / f"{stem}-{epoch:04d}{suffix}"
            _copy_atomic(target, current)
            older = [path for number, path in numbered_copies(directory, filename) if number <= epoch]
            for path in older[: max(0, len(older) - gather)]:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
    except (OSError, RuntimeError, pickle.PicklingError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"could not write checkpoint {current}: {_write_failure(exc, directory)}") from None
    _fsync_dir(directory)
    return target
