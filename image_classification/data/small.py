"""In-memory Fashion-MNIST and CIFAR-10: whole dataset as one uint8 tensor, batched tensor augmentation.

* Fashion-MNIST: the IDX files as Debian's ``dataset-fashion-mnist`` ships them
  (``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``; uncompressed files
  are accepted too). Validation set = ``t10k``. Train augmentation: random crop with 2 px zero padding.
  No horizontal flip: all Fashion-MNIST items are photographed in one canonical orientation (e.g. shoes
  point left), so flipped images would not look like the test set.
* CIFAR-10: the python-pickle batches directory ``cifar-10-batches-py`` (``data_batch_1..5``,
  ``test_batch``) or its parent. Train augmentation: random crop with 4 px zero padding + horizontal flip.

Images are normalised with the dataset's mean/std. ``in_chans=3`` for Fashion-MNIST repeats the gray
channel. An ``image_size`` other than the native one resizes each batch (``--interpolation``, bilinear by
default, antialiased). ``--augmentation`` applies its torchvision policy to each training image after the crop
and flip (per sample, drawn from the loader's own seeded generator; Fashion-MNIST uses the ImageNet policy,
CIFAR-10 AutoAugment its CIFAR-10 policy). Batches are
built on ``cfg.device`` (the dataset is copied there once), so no worker processes and no PIL are involved.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .augment import torch_interpolate_mode, torchvision_augmentation
from .config import DataConfig, DataError, Loaders
from .sharding import effective_drop_last, subset_indices

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


# ---------------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)
# ---------------------------------------------------------------------------------------------------------
def _find_idx_file(root: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise DataError(
        f"Fashion-MNIST directory {root} has no {stem}.gz (expected the four IDX files "
        f"{', '.join(s + '.gz' for pair in FASHION_MNIST_FILES.values() for s in pair)})"
    )


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                return handle.read()
        with open(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: corrupt or truncated file ({exc})") from None


def read_idx(path: str, expected_magic: int) -> np.ndarray:
    """Parse one IDX file (uint8 payload) into an array of its declared shape, validating header and size."""
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path} is not an IDX file (only {len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DataError(
            f"{path} is not an IDX file of the expected kind (magic 0x{magic:08x}, "
            f"expected 0x{expected_magic:08x})"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated (header of {header} bytes, file has {len(data)})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise DataError(
            f"{path} has {len(data)} bytes but its header {shape} needs {expected} (truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(root: str, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 (N, 1, 28, 28), labels int64 (N,))`` of ``split`` (``train`` or ``val`` = t10k)."""
    if not os.path.isdir(root):
        raise DataError(
            f"Fashion-MNIST DATA {root} is a file; give the directory holding the idx files" if os.path.exists(root)
            else f"Fashion-MNIST directory {root} does not exist (install Debian's dataset-fashion-mnist or pass DATA)"
        )
    image_stem, label_stem = FASHION_MNIST_FILES[split]
    image_path, label_path = _find_idx_file(root, image_stem), _find_idx_file(root, label_stem)
    images = read_idx(image_path, IDX_IMAGES_MAGIC)
    labels = read_idx(label_path, IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{image_path} holds {images.shape[0]} images but {label_path} {labels.shape[0]} labels"
        )
    if images.shape[0] == 0:
        raise DataError(f"{image_path} holds no images")
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{label_path} has label {int(labels.max())}, outside 0..9")
    return (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10 (python pickles)
# ---------------------------------------------------------------------------------------------------------
def find_cifar10_dir(root: Optional[str]) -> str:
    """The ``cifar-10-batches-py`` directory: ``root`` itself or ``root/cifar-10-batches-py``."""
    if not root:
        raise DataError("no DATA directory given for cifar10 (expected cifar-10-batches-py or its parent)")
    if not os.path.isdir(root):
        raise DataError(f"CIFAR-10 DATA {root} is a file; give the directory cifar-10-batches-py or its parent"
                        if os.path.exists(root) else f"CIFAR-10 directory {root} does not exist")
    for candidate in (root, os.path.join(root, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(candidate, CIFAR10_TEST_BATCH)):
            return candidate
    raise DataError(
        f"{root} is not a CIFAR-10 python directory (no {CIFAR10_TEST_BATCH} in it or in "
        f"{os.path.join(root, 'cifar-10-batches-py')}; expected data_batch_1..5 and test_batch)"
    )


def read_cifar_batch(path: str) -> Tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise DataError(f"CIFAR-10 batch {path} is missing")
    try:
        with open(path, "rb") as handle:
            entry = pickle.load(handle, encoding="bytes")
    except Exception as exc:
        raise DataError(
            f"cannot read CIFAR-10 batch {path}: corrupt or truncated ({type(exc).__name__})"
        ) from None
    if not isinstance(entry, dict):
        raise DataError(f"CIFAR-10 batch {path} is not a dict pickle")
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get("labels"))
    if data is None or labels is None:
        raise DataError(f"CIFAR-10 batch {path} lacks 'data' or 'labels'")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"CIFAR-10 batch {path} has data {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],):
        raise DataError(f"CIFAR-10 batch {path} has {labels.shape} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise DataError(f"CIFAR-10 batch {path} has labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root: Optional[str], split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 (N, 3, 32, 32), labels int64 (N,))`` of ``split`` (``train`` or ``val`` = test_batch)."""
    directory = find_cifar10_dir(root)
    names = CIFAR10_TRAIN_BATCHES if split == "train" else (CIFAR10_TEST_BATCH,)
    parts = [read_cifar_batch(os.path.join(directory, name)) for name in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if images.shape[0] == 0:
        raise DataError(f"CIFAR-10 {split} split in {directory} holds no images")
    return torch.from_numpy(images), torch.from_numpy(labels)


# ---------------------------------------------------------------------------------------------------------
# batched augmentation and loader
# ---------------------------------------------------------------------------------------------------------
def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of the zero-padded batch back to its size (torchvision RandomCrop(padding))."""
    if padding <= 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    device = images.device
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(device)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(device)
    rows = (top[:, None] + torch.arange(height, device=device))[:, :, None]  # (B, H, 1)
    cols = (left[:, None] + torch.arange(width, device=device))[:, None, :]  # (B, 1, W)
    index = torch.arange(batch, device=device)[:, None, None]
    return padded[index, :, rows, cols].permute(0, 3, 1, 2)  # advanced-index dims first: (B, H, W, C)


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def apply_per_sample(policy: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                     generator: torch.Generator) -> torch.Tensor:
    """``policy`` (a torchvision v2 augmentation, which draws from torch's global RNG) on each uint8 image of
    the batch with its own random draw; the draws come from ``generator`` and the caller's global RNG stream
    is left as it was."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([policy(image) for image in images])


class InMemoryLoader:
    """Batches of an in-memory uint8 dataset with sharding, per-epoch shuffling and tensor augmentation.

    Train: a permutation seeded by ``(seed, epoch)`` (identical on all ranks), padded to a multiple of
    ``world_size`` like DistributedSampler, then strided by rank. Val (``train=False``): the exact unpadded
    shard ``rank::world_size`` in order.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        train: bool,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        drop_last: bool,
        augment: bool,
        crop_padding: int,
        flip: bool,
        mean: Tuple[float, ...],
        std: Tuple[float, ...],
        in_chans: int,
        image_size: int,
        device: torch.device,
        memory_format: torch.memory_format,
        policy: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        interpolation: str = "bilinear",
    ) -> None:
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.train, self.batch_size = train, int(batch_size)
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.augment, self.crop_padding, self.flip = augment and train, crop_padding, flip
        self.in_chans, self.image_size = in_chans, image_size
        self.memory_format = memory_format
        self.policy = policy if train and augment else None
        self.interpolation = interpolation
        source_chans = images.shape[1]
        repeat = in_chans // source_chans
        self.mean = torch.tensor(list(mean) * repeat, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std) * repeat, device=device).view(1, -1, 1, 1)
        self.repeat = repeat
        self.epoch = 0
        n = images.shape[0]
        self.shard_size = -(-n // world_size) if train else len(range(rank, n, world_size))
        self.drop_last = effective_drop_last(drop_last, self.shard_size, self.batch_size) if train else False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.shard_size // self.batch_size
        return -(-self.shard_size // self.batch_size)

    def _indices(self) -> torch.Tensor:
        n = self.images.shape[0]
        if not self.train:
            return torch.arange(self.rank, n, self.world_size)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=generator)
        total = self.shard_size * self.world_size
        if total > n:  # pad by wrapping around, as DistributedSampler does
            order = torch.cat([order, order.repeat(-(-total // n))[: total - n]])
        return order[self.rank : total : self.world_size]

    def _transform(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.augment:
            images = random_crop(images, self.crop_padding, generator)
            if self.flip:
                images = random_hflip(images, generator)
            if self.policy is not None:
                images = apply_per_sample(self.policy, images, generator)
        x = images.float().div_(255.0)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            mode = torch_interpolate_mode(self.interpolation)
            smooth = mode != "nearest"
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode=mode,
                align_corners=False if smooth else None,
                antialias=smooth,
            )
            if mode == "bicubic":  # bicubic overshoots: keep the pixel range
                x = x.clamp_(0.0, 1.0)
        if self.repeat > 1:
            x = x.repeat(1, self.repeat, 1, 1)
        x = (x - self.mean) / self.std
        # the format's own strides, not merely a contiguous tensor: with one channel (Fashion-MNIST) the crop's
        # NHWC strides also pass as NCHW-contiguous, and convolution then picks channels_last for the stem's
        # weight gradient, which DDP reports as "Grad strides do not match bucket view strides"
        if x.stride() != torch.empty(x.shape, device="meta", memory_format=self.memory_format).stride():
            x = x.clone(memory_format=self.memory_format)
        return x

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        indices = self._indices().to(self.images.device)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 64 + self.rank + 17)
        for batch in range(len(self)):
            idx = indices[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield self._transform(self.images[idx], generator), self.labels[idx]


def _subset(
    images: torch.Tensor, labels: torch.Tensor, limit: Optional[int], seed: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    keep = subset_indices(images.shape[0], limit, seed)
    if keep is None:
        return images, labels
    return images[keep], labels[keep]


def build_small_loaders(cfg: DataConfig) -> Loaders:
    """Loaders for ``fashion-mnist`` or ``cifar10`` (see module docstring)."""
    info = cfg.info
    classes: List[str]
    if cfg.dataset == "fashion-mnist":
        root = cfg.root or info.default_root
        assert root is not None
        train_images, train_labels = load_fashion_mnist(root, "train")
        val_images, val_labels = load_fashion_mnist(root, "val")
        padding, flip, classes = 2, False, FASHION_MNIST_CLASSES
    elif cfg.dataset == "cifar10":
        train_images, train_labels = load_cifar10(cfg.root, "train")
        val_images, val_labels = load_cifar10(cfg.root, "val")
        padding, flip, classes = 4, True, CIFAR10_CLASSES
    else:
        raise DataError(f"{cfg.dataset} is not an in-memory dataset")
    if cfg.num_classes is not None and cfg.num_classes < len(classes):
        raise DataError(
            f"num_classes {cfg.num_classes} is smaller than the {len(classes)} classes of {cfg.dataset}"
        )
    num_classes = int(cfg.num_classes) if cfg.num_classes is not None else len(classes)
    train_images, train_labels = _subset(train_images, train_labels, cfg.train_subset, cfg.seed)
    val_images, val_labels = _subset(val_images, val_labels, cfg.val_subset, cfg.seed + 1)

    common: Dict[str, Any] = dict(  # the arguments both loaders share
        rank=cfg.rank,
        world_size=cfg.world_size,
        augment=cfg.augment,
        crop_padding=padding,
        flip=flip,
        mean=info.mean,
        std=info.std,
        in_chans=cfg.resolved_in_chans,
        image_size=cfg.resolved_image_size,
        device=cfg.torch_device,
        memory_format=cfg.torch_memory_format,
        interpolation=cfg.interpolation,
    )
    train = InMemoryLoader(
        train_images,
        train_labels,
        train=True,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        drop_last=cfg.drop_last,
        policy=torchvision_augmentation(cfg.augmentation, cfg.dataset, cfg.interpolation),
        **common,
    )
    val = InMemoryLoader(
        val_images,
        val_labels,
        train=False,
        batch_size=cfg.resolved_val_batch_size,
        seed=cfg.seed,
        drop_last=False,
        **common,
    )
    return Loaders(
        train,
        val,
        num_classes=num_classes,
        in_chans=cfg.resolved_in_chans,
        image_size=cfg.resolved_image_size,
        train_samples=train_images.shape[0],
        val_samples=val_images.shape[0],
        classes=list(classes),
    )
