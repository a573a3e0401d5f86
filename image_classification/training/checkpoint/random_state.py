"""Random-number-generator state: python ``random``, numpy's global generator, torch CPU and CUDA.

:func:`rng_state` captures them in a form ``torch.load(weights_only=True)`` accepts, so a resumed run
continues the same random streams; :func:`set_rng_state` restores them.
"""

from __future__ import annotations

import random
from typing import Any, Dict, Mapping

import torch

from .errors import CheckpointError, one_line

try:  # numpy is optional: torch runs without it
    import numpy as np
except ImportError:  # pragma: no cover - exercised only where numpy is absent
    np = None  # type: ignore[assignment]  # numpy is optional

__all__ = ["rng_state", "set_rng_state", "derive_seed"]


def derive_seed(*parts: int) -> int:
    """A seed in ``[0, 2**63)`` for ``torch.Generator.manual_seed`` that depends on every part (e.g. run seed,
    rank, batch index): the parts are hashed, so any sizes (a ``--seed`` up to 2**32-1 times a batch index)
    give a valid seed, where arithmetic such as ``(seed * P + rank) * Q + i`` overflows int64."""
    import hashlib

    text = ",".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


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
        raise CheckpointError(f"RNG state is malformed: {type(exc).__name__}: {one_line(exc, 160)}") from None
