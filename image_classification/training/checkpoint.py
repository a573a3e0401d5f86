"""Checkpoints that never lose a run: atomic writes, safe loading, weight conversion, RNG and signals.

* :func:`save_checkpoint` serializes once to a temporary file in the workspace, fsyncs it and
  renames it over ``checkpoint.pth.tar``; ``model_best.pth.tar`` and the per-epoch copies kept by
  ``--gather-checkpoints`` are copies of that finished file, each renamed into place, so a crash or
  a full disk at any moment leaves the previous files intact and no partial file behind.
* :func:`load_checkpoint` reads with ``torch.load(weights_only=True)``; every failure (missing,
  empty, truncated, corrupt, not a checkpoint) is a one-line :class:`CheckpointError` naming the file.
* :func:`load_model_weights` loads this project's checkpoints, raw state dicts, EMA
  (``AveragedModel``) states and the authors' released PEDConv layout, after checking the
  checkpoint's ``arch``/``conv`` fields and every key and shape against the model.
* :func:`rng_state` / :func:`set_rng_state` capture python, numpy, torch and CUDA generators in a
  form that ``weights_only`` loading accepts, so a resumed run continues the same random streams.
* :class:`GracefulShutdown` turns SIGTERM/SIGINT into a flag the trainer polls to checkpoint and exit.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import functools
import os
import pickle
import random
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from image_classification.dynamic.protocol import ForeignLayout
from image_classification.dynamic.registry import find_foreign_layout, parse_spec

try:  # numpy is optional: torch runs without it
    import numpy as np
except ImportError:  # pragma: no cover - exercised only where numpy is absent
    np = None  # type: ignore[assignment]

__all__ = [
    "CheckpointError",
    "GracefulShutdown",
    "WorkspaceLock",
    "check_workspace_writable",
    "existing_run_files",
    "remove_temporaries",
    "load_checkpoint",
    "load_model_weights",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

PathLike = Union[str, "os.PathLike[str]"]

BEST_FILENAME = "model_best.pth.tar"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 5


class CheckpointError(ValueError):
    """A checkpoint cannot be written, read or applied; the message is one line naming the problem."""


def _one_line(text: object, limit: int = 240) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Workspace
# --------------------------------------------------------------------------------------------


def check_workspace_writable(path: PathLike) -> Path:
    """Create ``path`` (and parents) if needed and check a file can be created in it.

    Writability is tested by creating and removing a temporary file, which is exact where
    ``os.access`` is not (root, ACLs, read-only mounts). Raises :class:`CheckpointError`.
    """
    workspace = Path(path).expanduser()
    if workspace.exists() and not workspace.is_dir():
        raise CheckpointError(f"workspace {workspace} exists and is not a directory")
    try:
        workspace.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"workspace {workspace} cannot be created: {exc.strerror or exc}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=workspace, prefix=".write-test-", suffix=".tmp")
    except OSError as exc:
        raise CheckpointError(f"workspace {workspace} is not writable: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)
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
    found += [path.name for _, path in _gathered(directory, filename)]
    if raport is not None:
        raport_path = Path(raport)
        with contextlib.suppress(OSError):
            if raport_path.is_file() and raport_path.stat().st_size > 0:
                found.append(os.path.relpath(raport_path, directory) if raport_path.is_absolute() else raport_path.name)
    return found


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------

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
            rebuilt._metadata = _weights_only_safe(metadata, f"{where}._metadata")  # type: ignore[attr-defined]
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
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _file_mode() -> int:
    """The mode ``open()`` gives new files under the process umask (read once; cached)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def _temporary_sibling(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``target``; it is removed unless renamed away.

    Its name carries the writer's pid (``.<name>.pid<PID>.<random>.tmp``), and it gets the permissions of
    an ordinary new file under the umask (mkstemp's 0600 would hide checkpoints from the other users of a
    shared cluster).
    """
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.pid{os.getpid()}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
    except OSError:  # pragma: no cover - filesystems without permissions
        pass
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


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


def _gathered(workspace: Path, filename: str) -> List[Tuple[int, Path]]:
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
    return _one_line(message)


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
            raise CheckpointError(f"gathering checkpoints needs a non-negative integer state['epoch'], got {raw_epoch!r}")
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
            older = [path for number, path in _gathered(directory, filename) if number <= epoch]
            for path in older[: max(0, len(older) - gather)]:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
    except (OSError, RuntimeError, pickle.PicklingError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"could not write checkpoint {current}: {_write_failure(exc, directory)}") from None
    _fsync_dir(directory)
    return target


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

# Globals that hold plain data and that older trainers (DeepLearningExamples included) left in
# checkpoints: numpy scalars/arrays (e.g. a numpy ``best_prec1``) and an ``argparse.Namespace``.
_BENIGN_GLOBALS = frozenset(
    {
        "argparse.Namespace",
        "numpy.dtype",
        "numpy.ndarray",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
    }
)


def _is_benign_global(name: str) -> bool:
    return name in _BENIGN_GLOBALS or (name.startswith("numpy.dtypes.") and name.endswith("DType"))


def _unsafe_globals(path: Path) -> Optional[List[str]]:
    """The globals a checkpoint references beyond torch's allowlist, or None if torch cannot tell."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    if finder is None:
        return None
    try:
        return list(finder(str(path)))
    except Exception:  # a legacy (non-zip) file or one torch cannot scan
        return None


def _torch_load(path: Path, map_location: Any, weights_only: bool) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.4/2.5 warn about weights_only defaults
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location=map_location, weights_only=weights_only)


def _looks_like_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def load_checkpoint(path: PathLike, map_location: Any = "cpu", trusted: bool = False) -> Dict[str, Any]:
    """Read a checkpoint and return it as a dict that has a ``"state_dict"`` entry.

    Loads with ``torch.load(weights_only=True)``. A file whose pickle references only plain-data
    globals (numpy scalars/arrays, ``argparse.Namespace``, as older trainers saved them) is then
    read in full; any other global is refused unless ``trusted=True`` (only for files whose source
    you trust: unpickling can run code). A raw state dict (a file holding only name -> tensor) is
    returned as ``{"state_dict": it}``; torchvision-reference checkpoints (``"model"``) likewise.

    Raises :class:`CheckpointError` naming the file when it is missing, empty, truncated,
    corrupt, not a dict, or holds no state dict.
    """
    file = Path(path).expanduser()
    if not file.exists():
        raise CheckpointError(f"checkpoint file not found: {file}")
    if file.is_dir():
        raise CheckpointError(f"checkpoint path {file} is a directory, not a file")
    try:
        size = file.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {file}: {exc.strerror or exc}") from None
    if size == 0:
        raise CheckpointError(f"checkpoint {file} is empty (0 bytes): truncated or corrupt")

    try:
        obj = _torch_load(file, map_location, weights_only=not trusted)
    except PermissionError as exc:
        raise CheckpointError(f"cannot read checkpoint {file}: {exc.strerror or exc}") from None
    except Exception as exc:  # torch/zip/pickle/OS errors of every kind: never a deep traceback
        message = str(exc)
        if "Unsupported global" in message or "unsupported GLOBAL" in message or "Weights only load failed" in message:
            obj = _load_with_benign_globals(file, map_location, message, exc)
        else:
            raise CheckpointError(f"cannot read checkpoint {file}: {_corrupt_reason(exc)}") from None

    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {file} holds a {type(obj).__name__}, not a dict")
    checkpoint = dict(obj)
    state_dict = checkpoint.get("state_dict")
    if state_dict is None:
        if isinstance(checkpoint.get("model"), Mapping) and _looks_like_state_dict(checkpoint["model"]):
            checkpoint["state_dict"] = checkpoint["model"]
        elif _looks_like_state_dict(checkpoint):
            checkpoint = {"state_dict": checkpoint}
        else:
            keys = ", ".join(sorted(map(str, checkpoint))[:_MAX_LISTED]) or "nothing"
            raise CheckpointError(f"checkpoint {file} has no 'state_dict' (top-level keys: {keys})")
    elif not isinstance(state_dict, Mapping):
        raise CheckpointError(f"checkpoint {file}: 'state_dict' is a {type(state_dict).__name__}, not a dict")
    return checkpoint


def _corrupt_reason(exc: BaseException) -> str:
    """'truncated or corrupt (<the useful part of torch's message>)' on one line."""
    message = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in message:  # weights_only unpickler: the reason sits between boilerplate paragraphs
        message = message.split(marker, 1)[1].split("Check the documentation", 1)[0]
    elif isinstance(exc, OSError) and exc.strerror:
        message = exc.strerror
    else:
        message = message.split(". ", 1)[0]  # torch's zip reader appends several sentences of advice
    return f"truncated, corrupt or not a PyTorch checkpoint ({type(exc).__name__}: {_one_line(message, 160)})"


TRUST_HINT = "if you trust its source, load it with --trust-checkpoints (main.py) or trusted=True"


def _load_with_benign_globals(file: Path, map_location: Any, message: str, exc: BaseException) -> Any:
    unsafe = _unsafe_globals(file)
    match = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", message)
    if unsafe is None or (not unsafe and match is None):
        if match is None and "Weights only load failed" in message and not unsafe:
            raise CheckpointError(f"cannot read checkpoint {file}: {_corrupt_reason(exc)}") from None
        named = match.group(1) if match else "an object outside torch's weights_only allowlist"
        raise CheckpointError(
            f"checkpoint {file} references {named}, which torch.load(weights_only=True) refuses to unpickle "
            f"(it could run code); {TRUST_HINT}"
        ) from None
    refused = [name for name in unsafe if not _is_benign_global(name)]
    if not refused and match is not None and not _is_benign_global(match.group(1)):
        refused = [match.group(1)]
    if refused:
        raise CheckpointError(
            f"checkpoint {file} references {', '.join(refused[:_MAX_LISTED])}, which torch.load(weights_only=True) "
            f"refuses to unpickle (it could run code); {TRUST_HINT}"
        ) from None
    try:  # every global the pickle names is plain data: the full unpickler runs no foreign code
        return _torch_load(file, map_location, weights_only=False)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {file}: {_corrupt_reason(error)}") from None


# --------------------------------------------------------------------------------------------
# Applying weights to a model
# --------------------------------------------------------------------------------------------


def _canonical_conv(spec: Optional[str]) -> Optional[str]:
    if spec is None:
        return None
    text = str(spec).strip()
    try:
        return str(parse_spec(text))
    except ValueError:  # unknown operator: compare the text as written
        return text


def _accepts(layout: ForeignLayout, conv: str) -> bool:
    """Whether a model of operator ``conv`` takes weights converted from ``layout`` (unparsable: no)."""
    try:
        return bool(layout.accepts(parse_spec(conv)))
    except ValueError:
        return False


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose state_dict has no wrapper prefixes (DDP/DataParallel, compile, AveragedModel)."""
    from torch.optim.swa_utils import AveragedModel

    wrappers: Tuple[type, ...] = (nn.parallel.DistributedDataParallel, nn.DataParallel, AveragedModel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def _strip_prefixes(state_dict: Mapping[str, Any], model_keys: Sequence[str]) -> Dict[str, Any]:
    """Remove ``module.`` / ``_orig_mod.`` prefixes shared by every key, and AveragedModel's counter."""
    sd = dict(state_dict)
    while sd:
        if "n_averaged" in sd and all(k.startswith("module.") for k in sd if k != "n_averaged"):
            if "n_averaged" not in model_keys:
                sd.pop("n_averaged")
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None or (model_keys and all(k.startswith(prefix) for k in model_keys)):
            return sd
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _listing(kind: str, items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{len(items)} {kind} ({shown}{more})"


def _check_keys(label: str, state_dict: Mapping[str, Any], target: nn.Module, strict: bool) -> None:
    expected = target.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = []
    for key, value in state_dict.items():
        if key in expected and isinstance(value, torch.Tensor) and isinstance(expected[key], torch.Tensor):
            if value.shape != expected[key].shape:
                mismatched.append(f"{key}: checkpoint {list(value.shape)} vs model {list(expected[key].shape)}")
    problems = []
    if strict and missing:
        problems.append(_listing("missing", missing))
    if strict and unexpected:
        problems.append(_listing("unexpected", unexpected))
    if mismatched:
        problems.append(_listing("shape mismatches", mismatched))
    if problems:
        raise CheckpointError(f"{label}: state_dict does not match the model: " + "; ".join(problems))


def load_model_weights(
    model: nn.Module,
    source: Union[PathLike, Mapping[str, Any]],
    expected_arch: Optional[str] = None,
    expected_conv: Optional[str] = None,
    strict: bool = True,
) -> Dict[str, Any]:
    """Load weights from ``source`` (a file or an already loaded dict) into ``model``; return the checkpoint.

    Accepted: this project's checkpoints (``arch``/``conv`` fields checked against
    ``expected_arch``/``expected_conv`` when both sides give them), raw state dicts,
    ``AveragedModel`` (EMA) states, state dicts with ``module.`` (DDP) or ``_orig_mod.``
    (torch.compile) prefixes, and the state-dict layouts of other code bases that the operators
    declare (``foreign_layouts``: the authors' PEDConv release, the DCD release), detected and
    converted by the operator's :class:`~image_classification.dynamic.protocol.ForeignLayout`. A DDP/DataParallel/compiled/AveragedModel ``model`` is loaded
    through its inner module. Keys and shapes are checked before anything is copied, so on a
    :class:`CheckpointError` (listing up to five offending keys per kind, with counts) the model is
    unchanged. ``strict=False`` tolerates missing/unexpected keys but never shape mismatches.
    """
    if isinstance(source, Mapping):
        label = "checkpoint"
        checkpoint: Dict[str, Any] = dict(source)
        if not isinstance(checkpoint.get("state_dict"), Mapping):
            if isinstance(checkpoint.get("model"), Mapping) and _looks_like_state_dict(checkpoint["model"]):
                checkpoint["state_dict"] = checkpoint["model"]
            elif _looks_like_state_dict(checkpoint):
                checkpoint = {"state_dict": checkpoint}
            else:
                raise CheckpointError("checkpoint dict has no 'state_dict' and is not a state dict itself")
    else:
        label = f"checkpoint {Path(source).expanduser()}"
        checkpoint = load_checkpoint(source)

    found_arch = checkpoint.get("arch")
    found_conv = checkpoint.get("conv")
    source_layout = find_foreign_layout(checkpoint["state_dict"])
    if found_arch is not None and source_layout is not None and source_layout.foreign_arch(str(found_arch)):
        found_arch = None  # another code base's own arch name (the DCD release's resnet50_dcd); keys/shapes are checked
    arch_differs = (
        expected_arch is not None and found_arch is not None and str(found_arch).strip() != str(expected_arch).strip()
    )
    conv_differs = (
        expected_conv is not None
        and found_conv is not None
        and _canonical_conv(found_conv) != _canonical_conv(expected_conv)
    )
    if arch_differs or conv_differs:
        fields = ", ".join(name for name, bad in (("arch", arch_differs), ("conv", conv_differs)) if bad)
        raise CheckpointError(
            f"{label} is for arch {found_arch} / operator {found_conv if found_conv is not None else '?'}, "
            f"model is arch {expected_arch if expected_arch is not None else found_arch} / operator "
            f"{expected_conv if expected_conv is not None else found_conv} (mismatching: {fields})"
        )

    target = _unwrap(model)
    model_keys = list(target.state_dict().keys())
    state_dict = _strip_prefixes(checkpoint["state_dict"], model_keys)

    layout = find_foreign_layout(state_dict)  # the operators' foreign layouts (the authors' releases)
    if layout is not None:
        if expected_conv is not None and not _accepts(layout, expected_conv):
            raise CheckpointError(layout.mismatch.format(label=label, conv=expected_conv))
        try:
            state_dict = dict(layout.convert(state_dict))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{label}: cannot convert {layout.description}: {_one_line(exc)}") from None

    _check_keys(label, state_dict, target, strict)
    try:
        target.load_state_dict(state_dict, strict=strict)
    except RuntimeError as exc:  # e.g. a dtype a buffer cannot take; keys and shapes were checked above
        raise CheckpointError(f"{label}: {_one_line(exc)}") from None
    return checkpoint


# --------------------------------------------------------------------------------------------
# Random number generators
# --------------------------------------------------------------------------------------------


def rng_state() -> Dict[str, Any]:
    """Capture python ``random``, numpy's global generator, torch CPU and every CUDA device's RNG.

    Only tensors, numbers, strings, tuples and dicts are used, so the result survives
    ``torch.save`` + ``torch.load(weights_only=True)``.
    """
    version, internal, gauss_next = random.getstate()
    state: Dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "torch": torch.get_rng_state(),
    }
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {
            "bit_generator": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generators captured by :func:`rng_state`.

    Parts absent from ``state`` or from this machine are skipped: a GPU run's CUDA states are
    ignored on a CPU-only resume, and with fewer visible GPUs only the first ones are restored.
    Raises :class:`CheckpointError` when ``state`` is not in :func:`rng_state`'s format.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"RNG state must be a dict, got {type(state).__name__}")
    try:
        if "python" in state:
            part = state["python"]
            internal = part["state"]
            internal = internal.tolist() if isinstance(internal, torch.Tensor) else list(internal)
            random.setstate((int(part["version"]), tuple(int(v) for v in internal), part["gauss_next"]))
        if "numpy" in state and np is not None:
            part = state["numpy"]
            keys = part["keys"]
            keys = keys.cpu().numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
            np.random.set_state(
                (
                    str(part["bit_generator"]),
                    keys.astype(np.uint32),
                    int(part["pos"]),
                    int(part["has_gauss"]),
                    float(part["cached_gaussian"]),
                )
            )
        if "torch" in state:
            torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
        if state.get("cuda") and torch.cuda.is_available():
            saved = list(state["cuda"])
            for device in range(min(len(saved), torch.cuda.device_count())):
                torch.cuda.set_rng_state(saved[device].cpu().to(torch.uint8), device)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"RNG state is malformed: {type(exc).__name__}: {_one_line(exc, 160)}") from None


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------


class GracefulShutdown:
    """Context manager turning SIGTERM/SIGINT into a flag the training loop polls.

    The first signal sets ``requested`` and records ``signum``; the trainer then saves a
    checkpoint and exits. A second signal gives up waiting: SIGINT raises ``KeyboardInterrupt``,
    any other signal gets its default action (SIGTERM terminates). Previous handlers are restored
    on exit. Outside the main thread (where Python cannot install handlers) it installs nothing
    but stays usable: ``requested`` can still be set by :meth:`request`.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.requested = False
        self.signum: Optional[int] = None
        self.active = False
        self._previous: Dict[int, Any] = {}

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

    def _handler(self, signum: int, frame: Any) -> None:
        if not self.requested:
            self.request(signum)
            return
        self._restore()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)

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
