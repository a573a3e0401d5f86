"""The data backend registry and :func:`build_loaders`: ``--data-backend`` names map to builder functions (the
built-ins import their module when called, so DALI is only needed when used); :func:`register_backend` adds one."""

from __future__ import annotations

from typing import Callable, Dict, List

import torch

from ..named_registry import NamedRegistry
from .config import DATASETS, SMALL_DATASETS, DataConfig, DataError, Loaders, resolve_memory_format

__all__ = ["BACKENDS", "build_loaders", "list_backends", "list_datasets", "register_backend", "unregister_backend",
           "validate_config"]


BackendFn = Callable[[DataConfig], Loaders]
#: ``--data-backend`` name -> builder ``fn(cfg) -> Loaders``; the built-ins import their module when called, so DALI
#: is only needed when used
BACKENDS: NamedRegistry[BackendFn] = NamedRegistry("data backend")


@BACKENDS.decorator("pytorch")
def _pytorch(cfg: DataConfig) -> Loaders:
    from .imagefolder import build_imagefolder_loaders

    return build_imagefolder_loaders(cfg)


@BACKENDS.decorator("dali-cpu")
@BACKENDS.decorator("dali-gpu")
def _dali(cfg: DataConfig) -> Loaders:
    from .dali import build_dali_loaders

    return build_dali_loaders(cfg)


@BACKENDS.decorator("synthetic")
def _synthetic(cfg: DataConfig) -> Loaders:
    from .synthetic import build_synthetic_loaders

    return build_synthetic_loaders(cfg)


#: the built-in builders, restored when a backend registered over one is unregistered
_BUILT_IN: Dict[str, BackendFn] = dict(BACKENDS.items())


def register_backend(name: str) -> Callable[[BackendFn], BackendFn]:
    """Register an extra backend ``fn(cfg) -> Loaders`` under ``name`` (replaces a built-in one of that name)."""
    return BACKENDS.decorator(name, replace=True)


def unregister_backend(name: str) -> None:
    """Remove a backend added with :func:`register_backend` (tests that register a temporary one); a built-in it
    replaced comes back."""
    BACKENDS.unregister(name)
    if name in _BUILT_IN:
        BACKENDS.register(name, _BUILT_IN[name])


def list_backends() -> List[str]:
    return BACKENDS.names()


def list_datasets() -> List[str]:
    return list(DATASETS)


def validate_config(cfg: DataConfig) -> None:
    """Raise :class:`DataError` for options that cannot work, before touching the disk."""
    try:
        BACKENDS.lookup(cfg.backend)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if cfg.dataset not in DATASETS:
        raise DataError(f"unknown dataset {cfg.dataset!r}; choose from {', '.join(DATASETS)}")
    for name in ("batch_size", "synthetic_train_batches", "synthetic_val_batches"):
        if int(getattr(cfg, name)) < 1:
            raise DataError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.val_batch_size is not None and cfg.val_batch_size < 1:
        raise DataError(f"val_batch_size must be >= 1, got {cfg.val_batch_size}")
    if cfg.workers < 0:
        raise DataError(f"workers must be >= 0, got {cfg.workers}")
    if cfg.world_size < 1 or not 0 <= cfg.rank < cfg.world_size:
        raise DataError(f"invalid rank {cfg.rank} for world size {cfg.world_size}")
    if cfg.image_size is not None and cfg.image_size < 8:
        raise DataError(f"image size must be >= 8, got {cfg.image_size}")
    if cfg.val_resize is not None and cfg.val_resize < cfg.resolved_image_size:
        raise DataError(
            f"val resize {cfg.val_resize} is smaller than the crop size {cfg.resolved_image_size}"
        )
    if cfg.num_classes is not None and cfg.num_classes < 1:
        raise DataError(f"num_classes must be >= 1, got {cfg.num_classes}")
    for name in ("train_subset", "val_subset"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise DataError(f"{name} must be >= 1, got {value}")
    allowed_chans = {"fashion-mnist": (1, 3)}.get(cfg.dataset, (3,))
    if cfg.backend == "synthetic":
        allowed_chans = (1, 3)
    if cfg.resolved_in_chans not in allowed_chans:
        raise DataError(
            f"{cfg.dataset} supports in_chans {' or '.join(map(str, allowed_chans))}, got {cfg.resolved_in_chans}"
        )
    from .augment import AUGMENTATIONS, INTERPOLATIONS

    if cfg.augmentation not in AUGMENTATIONS:
        raise DataError(f"unknown augmentation {cfg.augmentation!r}; choose from {', '.join(AUGMENTATIONS)}")
    if cfg.interpolation not in INTERPOLATIONS:
        raise DataError(f"unknown interpolation {cfg.interpolation!r}; choose from {', '.join(INTERPOLATIONS)}")
    resolve_memory_format(cfg.memory_format)
    try:
        torch.device(cfg.device)
    except (RuntimeError, TypeError) as exc:
        raise DataError(f"invalid device {cfg.device!r}: {exc}") from None


def build_loaders(cfg: DataConfig) -> Loaders:
    """Build the train and val loaders described by ``cfg`` (contract: module docstring).

    Raises:
        DataError: bad options or data (one-line message naming the problem).
    """
    validate_config(cfg)
    build = BACKENDS[cfg.backend]
    if cfg.dataset in SMALL_DATASETS and cfg.backend != "synthetic" and build is _BUILT_IN.get(cfg.backend):
        if cfg.backend != "pytorch":
            raise DataError(
                f"data backend {cfg.backend} reads JPEG folders only; use --data-backend pytorch "
                f"(in-memory reader) or synthetic for {cfg.dataset}"
            )
        from .small import build_small_loaders

        build = build_small_loaders
    loaders = build(cfg)
    if loaders.mean is None or loaders.std is None:
        repeat = max(1, loaders.in_chans // len(cfg.info.mean))
        loaders.mean, loaders.std = tuple(cfg.info.mean) * repeat, tuple(cfg.info.std) * repeat
    return loaders
