"""What a data run is and what it returns: :class:`DataConfig` (the options), :class:`Loaders` (the train
and val iterables and the facts the model is built for), :class:`DatasetInfo` / ``DATASETS`` (per-dataset
defaults) and :class:`DataError` (one-line bad-input error). The contract is in the package docstring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Protocol, Sequence, Tuple, Union

import torch

__all__ = [
    "BatchLoader",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SMALL_DATASETS",
    "DataConfig",
    "DataError",
    "DatasetInfo",
    "Loaders",
    "resolve_memory_format",
    "worker_failure",
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


class BatchLoader(Protocol):
    """One epoch's batches: iterable (images, targets) pairs that know how many there are (a DataLoader, the
    DALI iterator, the in-memory and synthetic loaders)."""

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...


class Loaders:
    """Result of :func:`build_loaders`; see the module docstring for the exact contract."""

    def __init__(
        self,
        train: BatchLoader,
        val: BatchLoader,
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
            f"Loaders(train={len(self.train)} batches/{self.train_samples} samples, "
            f"val={len(self.val)} batches/{self.val_samples} samples, "
            f"num_classes={self.num_classes}, in_chans={self.in_chans}, image_size={self.image_size})"
        )


def worker_failure(exc: BaseException, workers: Optional[int] = None) -> Optional[DataError]:
    """The one-line :class:`DataError` for a DataLoader worker that died (``exc`` is torch's RuntimeError
    "DataLoader worker (pid N) is killed by signal: Killed."), or None for any other error. torch raises it
    where the next batch is read, or from its SIGCHLD handler wherever the main process happens to be (in a
    forward, say), so the trainer converts it too."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or "DataLoader worker" not in text:
        return None
    reason = " ".join(text.split()).split(". Details", 1)[0].rstrip(".")
    now = f" (now {workers})" if workers is not None else ""
    return DataError(f"{reason}: out of memory? lower -j/--workers{now} or the batch size, or give the job more "
                     "memory (/dev/shm included)")
