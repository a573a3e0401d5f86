"""Safe checkpoint reading: :func:`load_checkpoint` reads with ``torch.load(weights_only=True)``.

Every failure (missing, empty, truncated, corrupt, not a checkpoint, a global that could run code) is a
one-line :class:`~.errors.CheckpointError` naming the file. Files whose pickle
names only plain-data globals (numpy scalars/arrays, ``argparse.Namespace``, as older trainers saved them)
are read in full.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

from ...compat import unsafe_globals_in_checkpoint
from .errors import CheckpointError, PathLike, one_line

__all__ = ["MAX_LISTED", "TRUST_HINT", "TRUST_WARNING", "add_trust_flag", "load_checkpoint", "looks_like_state_dict",
           "trust_checkpoints"]

_TRUSTED = {"all": False}


#: printed (stderr) whenever a program turns --trust-checkpoints on
TRUST_WARNING = ("warning: --trust-checkpoints: checkpoints are loaded with full unpickling, which runs any code a "
                 "file carries; use it only for files whose source you trust")


def trust_checkpoints(enabled: bool, program: str = "") -> None:
    """Process-wide default of :func:`load_checkpoint`'s ``trusted``: what a program's ``--trust-checkpoints``
    sets once, for every checkpoint it loads (a classifier, a pretrained backbone, a resume). Turning it on
    prints :data:`TRUST_WARNING`, prefixed by ``program``."""
    _TRUSTED["all"] = bool(enabled)
    if enabled:
        print(f"{program}: {TRUST_WARNING}" if program else TRUST_WARNING, file=sys.stderr, flush=True)


def add_trust_flag(parser: Any, help: Optional[str] = None) -> None:
    """``--trust-checkpoints``: the same flag, with the same meaning, in every program that loads checkpoints.

    Command line only: the action is marked ``command_line_only``, which the recipe loader
    (:func:`image_classification.training.config.load_config`) refuses as a key, so a downloaded recipe cannot
    turn on code execution from the checkpoint it names."""
    action = parser.add_argument(
        "--trust-checkpoints", action="store_true",
        help=help or ("load checkpoints with full unpickling, allowing objects outside torch's weights_only "
                      "allowlist: this can run code, use it only for files you trust (command line only)"))
    action.command_line_only = True

MAX_LISTED = 5


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
    try:
        return unsafe_globals_in_checkpoint(str(path))
    except Exception:  # a legacy (non-zip) file or one torch cannot scan
        return None


def _torch_load(path: Path, map_location: Any, weights_only: bool) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.4/2.5 warn about weights_only defaults
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location=map_location, weights_only=weights_only)


def looks_like_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def load_checkpoint(path: PathLike, map_location: Any = "cpu", trusted: Optional[bool] = None) -> Dict[str, Any]:
    """Read a checkpoint and return it as a dict that has a ``"state_dict"`` entry.

    Loads with ``torch.load(weights_only=True)``. A file whose pickle references only plain-data
    globals (numpy scalars/arrays, ``argparse.Namespace``, as older trainers saved them) is then
    read in full; any other global is refused unless ``trusted=True`` (only for files whose source
    you trust: unpickling can run code; ``None``: the program's :func:`trust_checkpoints` setting). A raw
    state dict (a file holding only name -> tensor) is returned as ``{"state_dict": it}``;
    torchvision-reference checkpoints (``"model"``) likewise.

    Raises :class:`CheckpointError` naming the file when it is missing, empty, truncated,
    corrupt, not a dict, or holds no state dict.
    """
    if trusted is None:
        trusted = _TRUSTED["all"]
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
        if isinstance(checkpoint.get("model"), Mapping) and looks_like_state_dict(checkpoint["model"]):
            checkpoint["state_dict"] = checkpoint["model"]
        elif looks_like_state_dict(checkpoint):
            checkpoint = {"state_dict": checkpoint}
        else:
            keys = ", ".join(sorted(map(str, checkpoint))[:MAX_LISTED]) or "nothing"
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
    return f"truncated, corrupt or not a PyTorch checkpoint ({type(exc).__name__}: {one_line(message, 160)})"


TRUST_HINT = "if you trust its source, load it with --trust-checkpoints (from Python: trusted=True)"


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
            f"checkpoint {file} references {', '.join(refused[:MAX_LISTED])}, which torch.load(weights_only=True) "
            f"refuses to unpickle (it could run code); {TRUST_HINT}"
        ) from None
    try:  # every global the pickle names is plain data: the full unpickler runs no foreign code
        return _torch_load(file, map_location, weights_only=False)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {file}: {_corrupt_reason(error)}") from None
