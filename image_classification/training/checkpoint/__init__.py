"""Checkpoints that never lose a run: this package's ``__init__`` is the one door to it.

Callers (the trainer included) import from ``image_classification.training.checkpoint``; each piece lives in
a module named for what it holds, and no module of the package uses another's private name:

* :mod:`.save` - :func:`save_checkpoint` (atomic: temporary file, fsync, rename; best-model and
  per-epoch copies renamed into place the same way), :func:`remove_temporaries`.
* :mod:`.load` - :func:`load_checkpoint` (``torch.load(weights_only=True)``; every failure a
  one-line :class:`CheckpointError` naming the file).
* :mod:`.weights` - :func:`load_model_weights` (this project's checkpoints, raw state dicts, EMA
  states and the authors' released layouts, checked against the model before anything is copied).
* :mod:`.random_state` - :func:`rng_state` / :func:`set_rng_state` (python, numpy, torch, CUDA generators),
  :func:`derive_seed`.
* :mod:`.shutdown` - :class:`GracefulShutdown` (SIGTERM/SIGINT become a flag the trainer polls), :class:`Interrupted`.
* :mod:`.workspace` - :func:`check_workspace_writable`, :class:`WorkspaceLock`, :func:`existing_run_files`.
* :mod:`.errors` - :class:`CheckpointError`.
"""

from .errors import CheckpointError, PathLike
from .load import TRUST_HINT, TRUST_WARNING, add_trust_flag, load_checkpoint, trust_checkpoints
from .random_state import derive_seed, rng_state, set_rng_state
from .save import BEST_FILENAME, remove_temporaries, save_checkpoint
from .shutdown import GracefulShutdown, Interrupted
from .weights import check_model_fields, load_model_weights, recorded_arch, recorded_args
from .workspace import (
    LOCK_FILENAME,
    WorkspaceLock,
    check_workspace_writable,
    directory_write_problem,
    existing_run_files,
    nearest_existing_directory,
)

__all__ = [
    "BEST_FILENAME",
    "LOCK_FILENAME",
    "TRUST_HINT",
    "CheckpointError",
    "GracefulShutdown",
    "Interrupted",
    "PathLike",
    "WorkspaceLock",
    "TRUST_WARNING",
    "add_trust_flag",
    "check_model_fields",
    "check_workspace_writable",
    "derive_seed",
    "directory_write_problem",
    "existing_run_files",
    "load_checkpoint",
    "load_model_weights",
    "nearest_existing_directory",
    "recorded_arch",
    "recorded_args",
    "remove_temporaries",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "trust_checkpoints",
]
