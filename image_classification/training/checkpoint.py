"""Checkpoints that never lose a run: the public names of the checkpoint modules, in one place.

Callers import from here; each piece lives in a module named for what it holds:

* :mod:`.checkpoint_save` - :func:`save_checkpoint` (atomic: temporary file, fsync, rename; best-model and
  per-epoch copies renamed into place the same way), :func:`remove_temporaries`.
* :mod:`.checkpoint_load` - :func:`load_checkpoint` (``torch.load(weights_only=True)``; every failure a
  one-line :class:`CheckpointError` naming the file).
* :mod:`.weight_loading` - :func:`load_model_weights` (this project's checkpoints, raw state dicts, EMA
  states and the authors' released layouts, checked against the model before anything is copied).
* :mod:`.random_state` - :func:`rng_state` / :func:`set_rng_state` (python, numpy, torch, CUDA generators).
* :mod:`.shutdown` - :class:`GracefulShutdown` (SIGTERM/SIGINT become a flag the trainer polls).
* :mod:`.workspace` - :func:`check_workspace_writable`, :class:`WorkspaceLock`, :func:`existing_run_files`.
* :mod:`.errors` - :class:`CheckpointError`.
"""

from .checkpoint_load import TRUST_HINT, add_trust_flag, load_checkpoint, trust_checkpoints
from .checkpoint_save import BEST_FILENAME, remove_temporaries, save_checkpoint
from .errors import CheckpointError, PathLike
from .random_state import rng_state, set_rng_state
from .shutdown import GracefulShutdown
from .weight_loading import load_model_weights
from .workspace import LOCK_FILENAME, WorkspaceLock, check_workspace_writable, existing_run_files

__all__ = [
    "BEST_FILENAME",
    "LOCK_FILENAME",
    "TRUST_HINT",
    "CheckpointError",
    "GracefulShutdown",
    "PathLike",
    "WorkspaceLock",
    "check_workspace_writable",
    "existing_run_files",
    "remove_temporaries",
    "load_checkpoint",
    "trust_checkpoints",
    "add_trust_flag",
    "load_model_weights",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]
