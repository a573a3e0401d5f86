"""``pytorch`` backend: torchvision ImageFolder on ``DATA/train`` and ``DATA/val``.

Train: RandomResizedCrop(size) + RandomHorizontalFlip (+ the ``--augmentation`` policy); val:
Resize(round(size * 256 / 224)) + CenterCrop(size); resizes with ``--interpolation``. The workers decode
(:func:`read_image`: libjpeg-turbo through ``torchvision.io.decode_jpeg`` for 3- and 1-channel JPEGs, PIL for
everything else), transform and collate in uint8; the float conversion and the ImageNet mean/std normalisation
happen on the training device in one pass (:mod:`.prefetch`). Corrupt images are detected lazily (a full upfront
decode is not feasible at ImageNet scale) and reported as a one-line :class:`DataError` naming the file, also when
the decode happens in a DataLoader worker process.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import datasets
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2.functional import pil_to_tensor

from .augment import torchvision_augmentation, torchvision_interpolation
from .config import DataConfig, DataError, Loaders, worker_failure
from .prefetch import PixelNormalizer, device_batches
from .sharding import effective_drop_last, subset_indices

IMG_EXTENSIONS = datasets.folder.IMG_EXTENSIONS


#: PIL's single-channel modes wider than 8 bits: ``convert("L"/"RGB")`` clips them to 0..255 instead of scaling
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def scale_to_8bit(image: Image.Image, path: str) -> Tuple[Image.Image, Optional[str]]:
    """``image`` with 16-bit, 32-bit integer or float pixels rescaled to an 8-bit ``L`` image, and a one-line note
    when the scale had to be guessed (None otherwise); 8-bit images are returned as they are.

    PIL's own conversion clips such pixels (a 16-bit PNG turns almost white, a [0, 1] float TIFF black). 16-bit
    images (and 32-bit integer ones whose values fit 16 bits, as older PIL reads 16-bit PNGs) scale by 255 / 65535;
    float images in [0, 1] by 255; other ranges are stretched from their min..max, and the note says so. NaN or
    infinite pixels have no 8-bit value: ValueError saying how many (a model would otherwise answer confidently on
    an all-NaN image turned black).
    """
    if image.mode not in _WIDE_MODES:
        return image, None
    import numpy as np

    pixels = np.asarray(image, dtype=np.float64)
    finite_mask = np.isfinite(pixels)
    if not finite_mask.all():
        bad = int(pixels.size - finite_mask.sum())
        raise ValueError(f"{bad} of {pixels.size} pixels are NaN or infinite (no 8-bit value to give them); "
                         f"fix or remove the file")
    finite = pixels[finite_mask]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    note = None
    if image.mode.startswith("I;16") or (image.mode == "I" and 0 <= low and high <= 65535):
        scale, offset = 255.0 / 65535.0, 0.0
    elif image.mode == "F" and 0 <= low and high <= 1:
        scale, offset = 255.0, 0.0
    else:
        kind = "float" if image.mode == "F" else "32-bit integer"
        scale, offset = (255.0 / (high - low) if high > low else 0.0), low
        note = (f"image {path}: {kind} pixels span [{low:g}, {high:g}], outside the ranges with a known scale "
                f"({'[0, 1]' if image.mode == 'F' else '0..65535'}); stretched from that span to 8 bits")
    scaled = np.clip((pixels - offset) * scale, 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled), note  # a 2-D uint8 array is an "L" image


def load_image(path: str, data: Optional[bytes] = None) -> Image.Image:
    """Open and fully decode ``path`` (or its bytes ``data``, already read) as RGB, raising :class:`DataError` naming
    the file on failure (16-bit and float images are scaled to 8 bits first, :func:`scale_to_8bit`; a guessed scale
    is a warning)."""
    try:
        with (io.BytesIO(data) if data is not None else open(path, "rb")) as handle:
            opened = Image.open(handle)
            opened.load()
            image, note = scale_to_8bit(opened, path)
            if note is not None:
                warnings.warn(note, stacklevel=2)
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: not a recognised image format") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for corrupt/truncated files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot read image {path}: {reason}") from None


try:  # deprecated in torchvision 0.29 in favour of torchcodec; PIL decodes everything when it is gone
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - a torchvision without its decoders
    decode_jpeg = None

_JPEG_MAGIC = b"\xff\xd8\xff"


def read_image(path: str) -> torch.Tensor:
    """``path`` decoded to a uint8 RGB tensor (3 x H x W), raising :class:`DataError` naming the file on failure.

    Baseline and progressive JPEGs with 3 or 1 channels (greyscale repeated, as PIL's ``convert("RGB")`` does) are
    decoded by libjpeg-turbo through ``torchvision.io.decode_jpeg``: the same pixels as PIL, which links the same
    library, in 0.83 vs 0.97 ms for a 500 x 375 ImageNet JPEG on this project's CPU. Everything else (PNG, TIFF,
    CMYK JPEGs, 16-bit and float images, a file ``decode_jpeg`` refuses) goes through :func:`load_image`, which
    also words the error.
    """
    if decode_jpeg is None:
        return pil_to_tensor(load_image(path))
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if data[:3] == _JPEG_MAGIC:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
        except RuntimeError:  # corrupt or truncated: PIL's reading says why, in its words
            image = None
        if image is not None and image.shape[0] == 3:
            return image
        if image is not None and image.shape[0] == 1:
            return image.expand(3, -1, -1).contiguous()
    return pil_to_tensor(load_image(path, data))


def find_split(root: Optional[str], split: str) -> str:
    """``root/split`` as a checked directory."""
    if not root:
        raise DataError("no DATA directory given (expected DATA/train and DATA/val class folders)")
    if not os.path.isdir(root):
        raise DataError(f"DATA {root} is a file; give the directory holding train/ and val/" if os.path.exists(root)
                        else f"DATA directory {root} does not exist")
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise DataError(f"DATA directory {root} has no '{split}' folder (expected {path}/<class>/<images>)")
    return path


def scan_class_folder(folder: str) -> List[str]:
    """Image files under ``folder`` in torchvision's ``make_dataset`` order (directories by path, files by
    name), following directory symlinks -- but each real directory and each real file only once.

    A symlink to a directory that contains it (``ln -s .. a/loop``, ``ln -s . a/self``) would make the scan
    endless (os.walk) or repeat a class dozens of times: it is a :class:`DataError` naming the link. Two
    names for one file (a file symlink, a directory linked twice) count once. Without any symlink in the
    class folder no real path is computed (ImageNet's 1.28M files cost no extra system call).
    """
    top = os.path.realpath(folder)
    seen_dirs = {top}
    pending = [(folder, top)]  # (path, real path)
    listed: List[Tuple[str, str, List[Tuple[str, bool]]]] = []
    any_link = False
    while pending:
        path, real = pending.pop()
        try:
            entries = list(os.scandir(path))
        except OSError:  # unreadable directory: skipped, as os.walk does
            continue
        files = []
        for entry in entries:
            linked = entry.is_symlink()
            try:
                is_dir = entry.is_dir()  # follows symlinks; no stat for plain entries (d_type)
            except OSError:
                is_dir = False
            if not is_dir:
                if entry.name.lower().endswith(IMG_EXTENSIONS):
                    files.append((entry.name, linked))
                    any_link = any_link or linked
                continue
            any_link = any_link or linked
            target = os.path.realpath(entry.path) if linked else os.path.join(real, entry.name)
            if target == real or real.startswith(target.rstrip(os.sep) + os.sep):
                raise DataError(f"symlink loop in the data: {entry.path} points to {target}, which contains it; "
                                "remove the link")
            if target not in seen_dirs:
                seen_dirs.add(target)
                pending.append((entry.path, target))
        listed.append((path, real, files))
    images: List[str] = []
    seen_files = set()
    for path, real, files in sorted(listed, key=lambda item: item[0]):
        for name, linked in sorted(files):
            if any_link:  # dedupe by real path only when some name may be a second one
                target = os.path.realpath(os.path.join(path, name)) if linked else os.path.join(real, name)
                if target in seen_files:
                    continue
                seen_files.add(target)
            images.append(os.path.join(path, name))
    return images


def scan_split(root: Optional[str], split: str) -> Tuple[List[str], List[Tuple[str, int]]]:
    """Classes and ``(path, label)`` samples of ``root/split`` (ImageFolder rules, no empty classes)."""
    path = find_split(root, split)
    try:
        classes, class_to_idx = datasets.folder.find_classes(path)
    except FileNotFoundError:
        raise DataError(f"{path} contains no class folders") from None
    samples = [(image, class_to_idx[name]) for name in sorted(class_to_idx)
               for image in scan_class_folder(os.path.join(path, name))]
    counts = [0] * len(classes)
    for _, label in samples:
        counts[label] += 1
    empty = [name for name, count in zip(classes, counts) if count == 0]
    if empty:
        shown = ", ".join(empty[:5]) + (f" (+{len(empty) - 5} more)" if len(empty) > 5 else "")
        raise DataError(
            f"{path}: class folder(s) without images: {shown} (extensions {', '.join(IMG_EXTENSIONS)})"
        )
    return classes, samples


def check_same_classes(train_classes: Sequence[str], val_classes: Sequence[str], root: str) -> None:
    if list(train_classes) != list(val_classes):
        only_train = sorted(set(train_classes) - set(val_classes))[:5]
        only_val = sorted(set(val_classes) - set(train_classes))[:5]
        raise DataError(
            f"{root}: train and val class folders differ (only in train: {only_train or '-'}, "
            f"only in val: {only_val or '-'})"
        )


def resolve_num_classes(cfg: DataConfig, found: int, where: str) -> int:
    if cfg.num_classes is None:
        return found
    if cfg.num_classes < found:
        raise DataError(f"num_classes {cfg.num_classes} is smaller than the {found} classes found in {where}")
    return int(cfg.num_classes)


class ImageFolderDataset(Dataset):
    """``(path, label)`` list + transform; decode errors become :class:`DataError` naming the file.

    Indexed by ``(index, sample_seed)`` (what :class:`SeededSampler` yields), it seeds torch's CPU generator with
    ``sample_seed`` before transforming: a sample's augmentation is a function of that seed alone, whichever
    worker process draws it and whatever that process drew before.
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], transform: Callable) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | Tuple[int, int]) -> Tuple[torch.Tensor, int]:
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        image = read_image(path)
        if sample_seed is not None:
            torch.default_generator.manual_seed(sample_seed)
        try:
            return self.transform(image), label
        except Exception as exc:
            raise DataError(f"cannot transform image {path}: {exc}") from None


def sample_seed(epoch_seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` in the epoch seeded ``epoch_seed`` (splitmix64 of the pair, so nearby
    pairs give unrelated seeds)."""
    mask = (1 << 64) - 1
    z = (epoch_seed * 0x9E3779B97F4A7C15 + index + 1) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1


class SeededSampler(Sampler[Tuple[int, int]]):
    """``sampler``'s indices paired with their :func:`sample_seed` for the current epoch seed."""

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler = sampler
        self.epoch_seed = 0

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch_seed = self.epoch_seed
        return ((index, sample_seed(epoch_seed, index)) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]  # the samplers used here have a length


class ExactShardSampler(Sampler[int]):
    """Unpadded, unshuffled shard ``rank, rank + world_size, ...`` (exact distributed validation)."""

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def reraise_one_line(exc: DataError) -> DataError:
    """Recover our one-line :class:`DataError` from DataLoader's worker re-raise (which embeds the traceback)."""
    text = str(exc)
    marker = "DataError: "
    if text.startswith("Caught DataError") and marker in text:
        return DataError(text.rsplit(marker, 1)[1])
    return exc


class EpochLoader:
    """A DataLoader whose order and augmentation are a pure function of ``(seed, epoch)``, yielding normalised
    float batches on the training device.

    ``set_epoch`` drives the DistributedSampler; each sample's augmentation is seeded from ``(seed, epoch, index)``
    (:class:`SeededSampler`), so the batches do not depend on ``workers`` and the worker processes can live across
    epochs (``persistent_workers``: no process start per epoch). With ``workers=0`` the caller's global CPU RNG
    state is restored after every batch (neither consumed nor perturbed). The dataset yields uint8 images;
    iterating yields ``(images float32 N x C x H x W in normalize's layout, targets int64 (N,))`` on ``device``
    (:func:`.prefetch.device_batches`); worker errors surface as one-line :class:`DataError`.
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: Sampler,
        batch_size: int,
        drop_last: bool,
        workers: int,
        device: torch.device,
        normalize: PixelNormalizer,
        seed: int,
    ) -> None:
        self.seed = int(seed)
        self.epoch = 0
        self.sampler = sampler
        self.seeded = SeededSampler(sampler)
        self.workers = int(workers)
        self.device = device
        self.normalize = normalize
        # the workers' base seed comes from here, not from the caller's global RNG
        self.generator = torch.Generator().manual_seed(self.seed)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.seeded,
            num_workers=workers,
            pin_memory=device.type == "cuda" and torch.cuda.is_available(),
            drop_last=drop_last,
            generator=self.generator,
            persistent_workers=workers > 0,
            prefetch_factor=2 if workers > 0 else None,
        )
        self.batch_size = batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(self.epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return device_batches(self.uint8_batches(), self.device, self.normalize)

    def uint8_batches(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches as the workers collate them: uint8 images and int64 targets on the CPU."""
        self.seeded.epoch_seed = self.seed * 1_000_003 + self.epoch
        iterator = iter(self.loader)
        while True:
            outer_rng = torch.get_rng_state() if self.workers == 0 else None
            try:
                images, targets = next(iterator)
            except StopIteration:
                return
            except DataError as exc:
                raise reraise_one_line(exc) from None
            except RuntimeError as exc:  # e.g. "DataLoader worker (pid 123) is killed by signal: Killed."
                failure = worker_failure(exc, self.workers)
                if failure is None:
                    raise
                raise failure from None
            finally:
                if outer_rng is not None:
                    torch.set_rng_state(outer_rng)
            yield images, targets


def tensor_interpolation(name: str) -> InterpolationMode:
    """The ``InterpolationMode`` that resizes uint8 tensors as PIL resized images under ``name``: PIL's nearest
    samples pixel centres, as ``NEAREST_EXACT`` does (torch's ``NEAREST`` is offset by half a pixel)."""
    return InterpolationMode.NEAREST_EXACT if name == "nearest" else torchvision_interpolation(name)


def imagenet_transforms(cfg: DataConfig) -> Tuple[Callable, Callable]:
    """Train: RandomResizedCrop + flip (+ ``cfg.augmentation``); val: resize + center crop; both with
    ``cfg.interpolation``, on uint8 C x H x W tensors (:func:`read_image`), returning uint8 tensors: the float
    conversion and normalisation are :class:`.prefetch.PixelNormalizer`'s.

    Same crop windows as PIL for the same RNG state; the bilinear and bicubic resizes are PIL's antialiased
    filters in torch's uint8 kernels, which round a small fraction of pixels (about 1 %) one level differently.
    """
    size = cfg.resolved_image_size
    interpolation = tensor_interpolation(cfg.interpolation)
    val = T.Compose([T.Resize(cfg.resolved_val_resize, interpolation=interpolation, antialias=True),
                     T.CenterCrop(size)])
    if not cfg.augment:
        return val, val
    policy = torchvision_augmentation(cfg.augmentation, cfg.dataset, cfg.interpolation)
    train = T.Compose([T.RandomResizedCrop(size, interpolation=interpolation, antialias=True), T.RandomHorizontalFlip(),
                       *([policy] if policy is not None else [])])
    return train, val


def imagenet_normalizer(cfg: DataConfig) -> PixelNormalizer:
    """The float conversion + mean/std normalisation of ``cfg``'s dataset, on ``cfg``'s device and layout."""
    return PixelNormalizer(cfg.info.mean, cfg.info.std, cfg.torch_device, cfg.torch_memory_format)


def build_imagefolder_loaders(cfg: DataConfig) -> Loaders:
    """The ``pytorch`` backend for the ImageNet (ImageFolder) layout."""
    train_classes, train_samples = scan_split(cfg.root, "train")
    val_classes, val_samples = scan_split(cfg.root, "val")
    check_same_classes(train_classes, val_classes, str(cfg.root))
    num_classes = resolve_num_classes(cfg, len(train_classes), str(cfg.root))
    train_tf, val_tf = imagenet_transforms(cfg)

    train_keep = subset_indices(len(train_samples), cfg.train_subset, cfg.seed)
    if train_keep is not None:
        train_samples = [train_samples[i] for i in train_keep.tolist()]
    val_keep = subset_indices(len(val_samples), cfg.val_subset, cfg.seed + 1)
    if val_keep is not None:
        val_samples = [val_samples[i] for i in val_keep.tolist()]
    train_set = ImageFolderDataset(train_samples, train_tf)
    val_set = ImageFolderDataset(val_samples, val_tf)

    train_sampler: DistributedSampler[int] = DistributedSampler(
        train_set, num_replicas=cfg.world_size, rank=cfg.rank, shuffle=True, seed=cfg.seed, drop_last=False
    )
    val_sampler = ExactShardSampler(len(val_set), cfg.rank, cfg.world_size)
    normalize = imagenet_normalizer(cfg)
    train = EpochLoader(
        train_set,
        train_sampler,
        cfg.batch_size,
        effective_drop_last(cfg.drop_last, len(train_sampler), cfg.batch_size),
        cfg.workers,
        cfg.torch_device,
        normalize,
        cfg.seed + 1000 * cfg.rank,
    )
    val = EpochLoader(
        val_set,
        val_sampler,
        cfg.resolved_val_batch_size,
        False,
        cfg.workers,
        cfg.torch_device,
        normalize,
        cfg.seed + 1000 * cfg.rank + 1,
    )
    return Loaders(
        train,
        val,
        num_classes=num_classes,
        in_chans=3,
        image_size=cfg.resolved_image_size,
        train_samples=len(train_set),
        val_samples=len(val_set),
        classes=train_classes,
    )
