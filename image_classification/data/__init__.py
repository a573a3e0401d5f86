"""Data backends: ``build_loaders(DataConfig) -> Loaders``.

Backends (``DataConfig.backend``, the ``--data-backend`` flag)
-------------------------------------------------------------
``pytorch``
    ImageNet layout ``DATA/train/<class>/*.jpg`` and ``DATA/val/<class>/*.jpg`` read with torchvision's
    ImageFolder; train: RandomResizedCrop + horizontal flip, val: resize to ``round(size * 256 / 224)`` +
    center crop; ImageNet mean/std normalisation; ``workers`` loader processes, pinned memory when
    ``device`` is CUDA. For ``dataset`` ``fashion-mnist`` / ``cifar10`` this backend uses the in-memory
    readers of :mod:`.small` (whole dataset as one uint8 tensor, batched tensor augmentation).
``dali-cpu`` / ``dali-gpu``
    NVIDIA DALI pipelines on the same ImageFolder layout (same file list and labels as ``pytorch``),
    decoded on the CPU or with the ``mixed`` (nvJPEG) decoder. ImageNet layout only.
``synthetic``
    Random tensors of the dataset's shape and class count, on ``device``, for throughput runs.

What the trainer gets
---------------------
``build_loaders(cfg)`` returns :class:`Loaders`:

* ``loaders.train`` / ``loaders.val``: iterables with ``len()`` (batches *on this rank* per epoch) that
  yield ``(images, targets)``:

  - ``images``: ``torch.float32``, shape ``(N, in_chans, image_size, image_size)``, normalised with the
    dataset's mean/std. On CPU (pinned when ``device`` is CUDA) for ``pytorch``/``dali-cpu``; on
    ``device`` for ``synthetic``, the in-memory small datasets and ``dali-gpu``. The trainer must always
    do ``images.to(device, non_blocking=True)`` (a no-op when already there) and may convert the memory
    format itself; ``synthetic`` and DALI already honour ``cfg.memory_format``.
  - ``targets``: ``torch.int64``, shape ``(N,)``, values in ``[0, loaders.num_classes)``, same device as
    ``images``.
  - ``N <= batch_size`` (train) / ``val_batch_size`` (val); only the last batch of an epoch may be smaller.

* Train: every rank sees ``len(loaders.train)`` batches (equal on all ranks). Shuffled per epoch from
  ``seed`` and the epoch number: **call** ``loaders.set_epoch(epoch)`` **before each epoch** (also drives
  DistributedSampler). With ``drop_last=True`` (default) an incomplete last batch is dropped, unless the
  rank's shard has fewer than ``batch_size`` samples (then it is kept, so tiny datasets still train).
  In DDP the train shards are padded by DistributedSampler (a few repeated samples, harmless for train).
* Val: **exact**. Each rank gets a disjoint shard without padding (sample ``i`` goes to rank
  ``i % world_size`` for ``pytorch`` / small datasets; contiguous shards for DALI). Shards differ by at most
  one sample, so ``len(loaders.val)`` may differ by one batch between ranks: do **not** run per-batch
  collectives in validation; accumulate per-rank sums (``loss * n``, correct top-1/top-5 counts, ``n``) and
  ``all_reduce`` them once at the end. The sum of ``n`` over ranks equals ``loaders.val_samples``.
* Determinism: ``pytorch`` (any ``workers``), the small datasets and ``synthetic`` produce an epoch that
  is a pure function of ``(seed, epoch, rank)``; they neither consume nor perturb the caller's global RNG
  (so resumed runs see the same data). DALI shuffles and augments with its own internal state (seeded from
  ``seed`` and rank), reproducible from a fresh start but not across a resume.
* Breaking out of an epoch early (e.g. ``--prof``) is fine; for DALI the next iteration continues the
  interrupted epoch (DALI cannot reset mid-epoch).
* ``loaders.num_classes``, ``loaders.in_chans``, ``loaders.image_size``: what the model must be built for.
* ``loaders.mean``, ``loaders.std``: the per-channel normalisation (``image = (pixel - mean) / std`` with
  pixels in ``[0, 1]``), e.g. for adversarial perturbations bounded in pixel space.
* ``loaders.train_samples`` / ``loaders.val_samples``: global sample counts (after subsetting).

Errors
------
Any bad input (missing DATA or ``train``/``val`` folder, empty class folder, corrupt or unreadable image
-- lazily, when the batch containing it is loaded, also from worker processes --, Fashion-MNIST/CIFAR
path without the expected files or with corrupt files, ``dali-gpu`` without CUDA, DALI not installed,
inconsistent options) raises :class:`DataError` (a ``ValueError``) whose message is one line naming the
problem. The trainer prints ``f"error: {exc}"`` and exits with status 2. Image decode errors surface while
iterating ``loaders.train`` / ``loaders.val`` (DALI, which prefetches, may already raise them in
``build_loaders``), so the trainer must catch ``DataError`` around the loops too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "BACKENDS",
    "DATASETS",
    "DataConfig",
    "DataError",
    "DatasetInfo",
    "Loaders",
    "build_loaders",
    "list_backends",
    "list_datasets",
    "register_backend",
]


class DataError(ValueError):
    """Bad data input; ``str(exc)`` is a single line naming the problem (the trainer exits with 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: defaults the loaders fall back to."""

    name: str
    num_classes: int
    image_size: int
    in_chans: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    default_root: Optional[str] = None


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATASETS: Dict[str, DatasetInfo] = {
    "imagenet": DatasetInfo("imagenet", 1000, 224, 3, IMAGENET_MEAN, IMAGENET_STD),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", 10, 28, 1, (0.2860,), (0.3530,), default_root="/usr/share/datasets/fashion-mnist"
    ),
    "cifar10": DatasetInfo("cifar10", 10, 32, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

SMALL_DATASETS = ("fashion-mnist", "cifar10")


@dataclass
class DataConfig:
    """Everything :func:`build_loaders` needs. Only ``backend``/``dataset``/``root`` are usually required.

    Attributes:
        backend: ``pytorch`` | ``dali-cpu`` | ``dali-gpu`` | ``synthetic``.
        dataset: ``imagenet`` (ImageFolder layout) | ``fashion-mnist`` | ``cifar10``.
        root: DATA directory. ``imagenet``: contains ``train/`` and ``val/``. ``fashion-mnist``: directory of
            the four IDX ``.gz`` files (default ``/usr/share/datasets/fashion-mnist``). ``cifar10``: the
            ``cifar-10-batches-py`` directory or its parent. Unused by ``synthetic``.
        batch_size: per-rank train batch size.
        val_batch_size: per-rank val batch size (default: ``batch_size``).
        workers: loader worker processes (``-j``); 0 loads in the main process. DALI: CPU threads (>= 1).
            Ignored by ``synthetic`` and the in-memory fashion-mnist / cifar10 readers.
        image_size: train crop / val crop size; default 224 (imagenet), 28 (fashion-mnist), 32 (cifar10).
            Small datasets at another size are resized (bilinear) on the batch.
        val_resize: imagenet val resize before the center crop; default ``round(image_size * 256 / 224)``.
        num_classes: ``None``: the dataset's (class folders found, or 10). A larger value is allowed (model
            with extra outputs); a smaller one than the data's labels is a DataError. Synthetic: labels
            drawn in ``[0, num_classes)``.
        in_chans: ``None``: dataset default (3; fashion-mnist 1). Fashion-MNIST accepts 3 (gray repeated).
        rank, world_size: distributed position; shards data (train padded, val exact).
        seed: base seed for shuffling / augmentation (combined with the epoch number and rank).
        device: where the trainer computes; pinned memory / dali-gpu / synthetic / small datasets use it.
        memory_format: ``"nchw"`` | ``"nhwc"`` (or a ``torch.memory_format``) for backends that build
            batches themselves (synthetic, DALI, small datasets).
        augment: ``False`` uses the deterministic val transform for training too.
        drop_last: drop the incomplete last train batch (see module docstring).
        train_subset / val_subset: use only this many samples (a seeded random subset, same on all ranks).
        synthetic_train_batches / synthetic_val_batches: epoch length of the synthetic backend (per rank).
        augmentation: ``none`` | ``autoaugment`` | ``randaugment`` | ``trivialaugment`` added to the training
            images (:mod:`.augment`); ignored by ``synthetic``.
        interpolation: ``bilinear`` | ``bicubic`` | ``nearest``: the filter of the train crop resize and the
            val resize (small datasets: of the resize to ``image_size``); ignored by ``synthetic``.
    """

    backend: str = "pytorch"
    dataset: str = "imagenet"
    root: Optional[str] = None
    batch_size: int = 256
    val_batch_size: Optional[int] = None
    workers: int = 4
    image_size: Optional[int] = None
    val_resize: Optional[int] = None
    num_classes: Optional[int] = None
    in_chans: Optional[int] = None
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    device: Union[str, torch.device] = "cpu"
    memory_format: Union[str, torch.memory_format] = "nchw"
    augment: bool = True
    drop_last: bool = True
    train_subset: Optional[int] = None
    val_subset: Optional[int] = None
    synthetic_train_batches: int = 100
    synthetic_val_batches: int = 10
    augmentation: str = "none"
    interpolation: str = "bilinear"

    # ---- derived values (no side effects) -------------------------------------------------------------
    @property
    def info(self) -> DatasetInfo:
        return DATASETS[self.dataset]

    @property
    def resolved_image_size(self) -> int:
        return int(self.image_size) if self.image_size is not None else self.info.image_size

    @property
    def resolved_val_resize(self) -> int:
        if self.val_resize is not None:
            return int(self.val_resize)
        return int(round(self.resolved_image_size * 256 / 224))

    @property
    def resolved_in_chans(self) -> int:
        return int(self.in_chans) if self.in_chans is not None else self.info.in_chans

    @property
    def resolved_val_batch_size(self) -> int:
        return int(self.val_batch_size) if self.val_batch_size is not None else int(self.batch_size)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_memory_format(self) -> torch.memory_format:
        return resolve_memory_format(self.memory_format)


def resolve_memory_format(memory_format: Union[str, torch.memory_format]) -> torch.memory_format:
    """``"nchw"``/``"nhwc"`` (or ``channels_last``/``contiguous_format``) -> ``torch.memory_format``."""
    if isinstance(memory_format, torch.memory_format):
        return memory_format
    names = {
        "nchw": torch.contiguous_format,
        "contiguous_format": torch.contiguous_format,
        "nhwc": torch.channels_last,
        "channels_last": torch.channels_last,
    }
    key = str(memory_format).lower()
    if key not in names:
        raise DataError(f"unknown memory format {memory_format!r}; expected nchw or nhwc")
    return names[key]


class Loaders:
    """Result of :func:`build_loaders`; see the module docstring for the exact contract."""

    def __init__(
        self,
        train: Iterable[Tuple[torch.Tensor, torch.Tensor]],
        val: Iterable[Tuple[torch.Tensor, torch.Tensor]],
        num_classes: int,
        in_chans: int,
        image_size: int,
        train_samples: int,
        val_samples: int,
        classes: Optional[List[str]] = None,
        calibration: Optional[Callable[[], Iterable[Tuple[torch.Tensor, torch.Tensor]]]] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ) -> None:
        self.train = train
        self._calibration = calibration
        self.val = val
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        self.image_size = int(image_size)
        self.train_samples = int(train_samples)
        self.val_samples = int(val_samples)
        self.classes = classes
        # per-channel normalisation of the images: pixel value in [0, 1] = image * std + mean (filled in by
        # build_loaders from the dataset when a backend does not set it)
        self.mean: Optional[Tuple[float, ...]] = tuple(float(m) for m in mean) if mean is not None else None
        self.std: Optional[Tuple[float, ...]] = tuple(float(s) for s in std) if std is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reseed shuffling/augmentation for ``epoch`` (call before iterating ``train`` each epoch)."""
        self.epoch = int(epoch)
        for loader in (self.train, self.val):
            set_epoch = getattr(loader, "set_epoch", None)
            if set_epoch is not None:
                set_epoch(self.epoch)

    def calibration_batches(self) -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
        """Training batches (training augmentation) for re-estimating BatchNorm statistics (``--precise-bn``).

        Iterating them leaves ``train``'s stream untouched: for the ``pytorch``, in-memory and ``synthetic``
        backends they are the current epoch's first batches again (``train`` is re-iterable and a pure
        function of ``(seed, epoch, rank)``); DALI, whose iterator cannot restart mid-epoch, gets a second
        training pipeline built on first use.
        """
        if self._calibration is not None:
            return self._calibration()
        return self.train

    def __repr__(self) -> str:
        return (
            f"Loaders(train={len(self.train)} batches/{self.train_samples} samples, "  # type: ignore[arg-type]
            f"val={len(self.val)} batches/{self.val_samples} samples, "  # type: ignore[arg-type]
            f"num_classes={self.num_classes}, in_chans={self.in_chans}, image_size={self.image_size})"
        )


BackendFn = Callable[[DataConfig], Loaders]
BACKENDS: Dict[str, str] = {
    # backend name -> "module:function" (imported lazily so DALI is only needed when used)
    "pytorch": "imagefolder:build_imagefolder_loaders",
    "dali-cpu": "dali:build_dali_loaders",
    "dali-gpu": "dali:build_dali_loaders",
    "synthetic": "synthetic:build_synthetic_loaders",
}
_REGISTERED: Dict[str, BackendFn] = {}


def register_backend(name: str) -> Callable[[BackendFn], BackendFn]:
    """Register an extra backend ``fn(cfg) -> Loaders`` under ``name`` (overrides a built-in one)."""

    def decorator(fn: BackendFn) -> BackendFn:
        _REGISTERED[name] = fn
        return fn

    return decorator


def list_backends() -> List[str]:
    return sorted(set(BACKENDS) | set(_REGISTERED))


def list_datasets() -> List[str]:
    return list(DATASETS)


def _resolve_backend(name: str) -> BackendFn:
    if name in _REGISTERED:
        return _REGISTERED[name]
    import importlib

    module_name, fn_name = BACKENDS[name].split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, fn_name)


def validate_config(cfg: DataConfig) -> None:
    """Raise :class:`DataError` for options that cannot work, before touching the disk."""
    if cfg.backend not in list_backends():
        raise DataError(f"unknown data backend {cfg.backend!r}; choose from {', '.join(list_backends())}")
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
    if cfg.backend == "synthetic" or cfg.backend in _REGISTERED:
        loaders = _resolve_backend(cfg.backend)(cfg)
    elif cfg.dataset in SMALL_DATASETS:
        if cfg.backend != "pytorch":
            raise DataError(
                f"data backend {cfg.backend} reads JPEG folders only; use --data-backend pytorch "
                f"(in-memory reader) or synthetic for {cfg.dataset}"
            )
        from .small import build_small_loaders

        loaders = build_small_loaders(cfg)
    else:
        loaders = _resolve_backend(cfg.backend)(cfg)
    if loaders.mean is None or loaders.std is None:
        repeat = max(1, loaders.in_chans // len(cfg.info.mean))
        loaders.mean, loaders.std = tuple(cfg.info.mean) * repeat, tuple(cfg.info.std) * repeat
    return loaders


# Re-exported helpers used by several backends.
def shard_indices(n: int, rank: int, world_size: int) -> range:
    """Indices of an exact (unpadded) shard: ``rank, rank + world_size, ...`` below ``n``."""
    return range(rank, n, world_size)


def subset_indices(n: int, limit: Optional[int], seed: int) -> Optional[torch.Tensor]:
    """A seeded random subset of ``limit`` of ``n`` indices (sorted), or ``None`` when no subsetting."""
    if limit is None or limit >= n:
        return None
    generator = torch.Generator().manual_seed(int(seed) + 7919)
    return torch.randperm(n, generator=generator)[:limit].sort().values


def effective_drop_last(drop_last: bool, shard_size: int, batch_size: int) -> bool:
    """Drop the incomplete last batch only when the shard holds at least one full batch."""
    return bool(drop_last) and shard_size >= batch_size
