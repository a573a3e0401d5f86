"""``dali-cpu`` / ``dali-gpu`` backends: NVIDIA DALI pipelines (fn API) on the ImageFolder layout.

The file list and labels are the ones the ``pytorch`` backend uses (same class order, same image extensions,
same empty-class check), handed to ``fn.readers.file(files=..., labels=...)``, which shards them by rank
(``shard_id=rank, num_shards=world_size``; contiguous shards as DALI defines them).

* train: ``readers.file(random_shuffle=True)`` -> ``decoders.image_random_crop`` (``cpu`` for dali-cpu, ``mixed`` =
  nvJPEG for dali-gpu; the random-resized-crop window, area 0.08-1, aspect 3/4-4/3, decoded alone) -> ``resize``
  to the crop size -> (``--augmentation``: DALI's own AutoAugment ImageNet
  policy / RandAugment / TrivialAugment Wide from ``nvidia.dali.auto_aug``) -> ``crop_mirror_normalize`` with
  a ``random.coin_flip`` mirror. Resizes use ``--interpolation`` (``INTERP_LINEAR``/``CUBIC``/``NN``).
  Every rank yields the same number of batches (DALI counts from the largest shard): the incomplete
  last batch is dropped (``LastBatchPolicy.DROP``) or, for shards smaller than one batch, filled
  (``LastBatchPolicy.FILL``).
* val: ``readers.file(pad_last_batch=True, stick_to_shard=True)`` -> decode -> ``resize(resize_shorter=
  round(size * 256 / 224))`` -> ``crop_mirror_normalize`` center crop; ``LastBatchPolicy.PARTIAL`` removes the
  padding, so each sample is counted exactly once over all ranks.

Outputs match the ``pytorch`` backend: float32 NCHW (channels_last strides for ``memory_format="nhwc"``)
normalised with the ImageNet mean/std, int64 labels of shape ``(N,)``. dali-gpu normalises in DALI's
``crop_mirror_normalize`` on the GPU; dali-cpu crops and flips there in uint8 and the conversion to float happens on
the training device (:mod:`.prefetch`, next batch copied on a side stream on CUDA). dali-cpu runs with
``device_id=None`` (no GPU needed); dali-gpu needs CUDA and raises :class:`DataError` otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .config import DataConfig, DataError, Loaders
from .imagefolder import check_same_classes, resolve_num_classes, scan_split
from .prefetch import PixelNormalizer, device_batches
from .sharding import effective_drop_last, subset_indices

_LOG = logging.getLogger(__name__)
DALI_INSTALL_HINT = "pip install nvidia-dali-cuda120 (or the nvidia-dali-cuda1xx wheel matching your CUDA)"


def import_dali() -> Any:
    """Import DALI or raise a one-line :class:`DataError` saying how to install it."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError as exc:
        raise DataError(
            f"the DALI data backends need NVIDIA DALI ({exc}); install it with: {DALI_INSTALL_HINT}"
        ) from None
    return nvidia.dali


def find_bad_image(files: Sequence[str], budget_s: float = 30.0) -> Optional[str]:
    """First file PIL cannot fully decode, searching for at most ``budget_s`` seconds (DALI does not say)."""
    from .imagefolder import load_image

    deadline = time.monotonic() + budget_s
    for path in files:
        if time.monotonic() > deadline:
            _LOG.warning("gave up looking for the undecodable image after %g s (%d files)", budget_s, len(files))
            return None
        try:
            load_image(path)
        except DataError:
            return path
    return None


def _dataset_file_in(text: str, files: Sequence[str]) -> Optional[str]:
    """The first path in DALI's message that is one of the dataset's files (DALI names files it cannot open)."""
    candidates = re.findall(r"(/[^\s'\"`,;]+)", text)
    if not candidates:
        return None
    known = set(files)
    return next((path.rstrip(".:") for path in candidates if path.rstrip(".:") in known), None)


def _one_line_dali_error(exc: BaseException, files: Sequence[str]) -> DataError:
    """Condense DALI's multi-line pipeline error; for decoder failures name the offending file."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    noise = (
        "Critical error in pipeline",
        "Current pipeline object",
        'File "',  # the Python traceback of the pipeline definition (not "File mapping failed: <path>")
        "C++ context:",
        "encountered:",
        "which was used",
    )
    details = [line for line in lines if not line.startswith(noise) and "fn." not in line.split("`")[0]]
    operator = next((line.rstrip(",") for line in lines if line.startswith("Error in ")), "")
    reason = "; ".join(part for part in (operator, details[-1] if details else "") if part)[:300]
    named = _dataset_file_in(text, files)
    if named is not None:
        try:
            empty = os.path.getsize(named) == 0
        except OSError:
            empty = False
        what = "is empty (0 bytes)" if empty else "cannot be read"
        return DataError(f"image {named} {what} (DALI: {details[-1] if details else reason})")
    if "decoders" in operator or "decod" in reason.lower():
        bad = find_bad_image(files)
        if bad is not None:
            return DataError(f"cannot decode image {bad} (DALI: {reason})")
        return DataError(
            f"DALI could not decode an image of the dataset ({reason}); run with --data-backend "
            "pytorch to have the file named"
        )
    return DataError(f"DALI pipeline failed: {reason or type(exc).__name__}")


def _create_pipeline(
    files: List[str],
    labels: List[int],
    *,
    train: bool,
    augment: bool,
    batch_size: int,
    num_threads: int,
    device_id: Any,
    seed: int,
    shard_id: int,
    num_shards: int,
    decoder_device: str,
    size: int,
    val_resize: int,
    mean: Sequence[float],
    std: Sequence[float],
    layout: str,
    augmentation: str = "none",
    interpolation: str = "bilinear",
) -> Any:
    from nvidia.dali import fn, pipeline_def, types

    policy = _dali_policy(augmentation) if train and augment else None
    interp_type = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC,
                   "nearest": types.INTERP_NN}[interpolation]

    @pipeline_def(
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed, prefetch_queue_depth=2,
        enable_conditionals=policy is not None,  # DALI's automatic augmentations select operations with `if`
    )
    def pipeline() -> Tuple[Any, Any]:
        jpegs, targets = fn.readers.file(
            files=files,
            labels=labels,
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=train,
            pad_last_batch=True,
            stick_to_shard=not train,
            name="Reader",
        )
        # nvJPEG buffer sizes as in DeepLearningExamples: avoids reallocations during the first ImageNet epoch
        padding: Dict[str, Any] = ({"device_memory_padding": 211025920, "host_memory_padding": 140544512}
                                   if decoder_device == "mixed" else {})
        if train and augment:
            # the random-resized-crop window decoded alone (a region-of-interest decode on libjpeg-turbo and nvJPEG
            # reads less of each JPEG), then resized: DeepLearningExamples' pipeline, the same area/aspect ranges
            images = fn.decoders.image_random_crop(
                jpegs, device=decoder_device, output_type=types.RGB, random_area=[0.08, 1.0],
                random_aspect_ratio=[3.0 / 4.0, 4.0 / 3.0], num_attempts=100, **padding)
            images = fn.resize(images, size=[size, size], interp_type=interp_type, antialias=True)
            if policy is not None:
                images = policy(images, shape=[size, size])
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB, **padding)
            images = fn.resize(
                images, resize_shorter=val_resize, interp_type=interp_type, antialias=True
            )
            mirror = 0
        if decoder_device == "mixed":  # on the GPU: crop, flip, float conversion and normalisation in one kernel
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=layout, crop=(size, size),
                                              crop_pos_x=0.5, crop_pos_y=0.5, mean=[255.0 * m for m in mean],
                                              std=[255.0 * s for s in std], mirror=mirror)
        else:  # on the CPU: uint8 out (a quarter of the bytes), normalised on the training device (PixelNormalizer)
            images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout=layout, crop=(size, size),
                                              crop_pos_x=0.5, crop_pos_y=0.5, mirror=mirror)
        if decoder_device == "mixed":
            targets = targets.gpu()
        return images, targets

    with quiet_dali_deprecations():
        return pipeline()


@contextlib.contextmanager
def quiet_dali_deprecations() -> Iterator[None]:
    """Silence DALI's warnings about its own ``fn.experimental`` aliases, which its ``auto_aug`` module still
    calls (nothing a user can act on)."""
    # DALI forces these warnings on with its own "default" filter, so filters cannot hide them: drop them at display
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
            if not re.search(r"nvidia\.dali\.fn\.experimental\.\w+` is now deprecated", str(message)):
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def _dali_policy(name: str) -> Optional[Callable[..., Any]]:
    """DALI's own implementation of ``--augmentation name`` (``nvidia.dali.auto_aug``, DALI >= 1.26)."""
    if name == "none":
        return None
    try:
        from nvidia.dali.auto_aug import auto_augment, rand_augment, trivial_augment
    except ImportError:
        raise DataError(f"--augmentation {name} on the DALI backends needs nvidia.dali.auto_aug (DALI >= 1.26); "
                        f"upgrade DALI ({DALI_INSTALL_HINT}) or use --data-backend pytorch") from None
    from .augment import RANDAUGMENT_MAGNITUDE, RANDAUGMENT_OPS

    policies = {
        "autoaugment": auto_augment.auto_augment_image_net,
        "randaugment": lambda images, shape: rand_augment.rand_augment(
            images, n=RANDAUGMENT_OPS, m=RANDAUGMENT_MAGNITUDE, shape=shape),
        "trivialaugment": trivial_augment.trivial_augment_wide,
    }
    return policies[name]


class DaliLoader:
    """Wraps ``DALIGenericIterator``: yields ``(images float32 NCHW, targets int64 (N,))``.

    ``length`` is this rank's batch count; empty padding-only batches (possible on the smaller val shards) are
    skipped.
    """

    def __init__(self, pipeline: Any, files: List[str], policy: Any, length: int, nhwc: bool,
                 normalize: Optional[PixelNormalizer] = None, device: Optional[torch.device] = None) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.files = files
        self.length = int(length)
        self.nhwc = nhwc
        self.normalize = normalize
        self.device = device or torch.device("cpu")
        try:
            with quiet_dali_deprecations():
                pipeline.build()
            self.iterator = DALIGenericIterator(
                [pipeline], ["data", "label"], reader_name="Reader", last_batch_policy=policy, auto_reset=True
            )
        except RuntimeError as exc:
            raise _one_line_dali_error(exc, files) from None

    def set_epoch(self, epoch: int) -> None:
        """DALI reshuffles internally each epoch; nothing to do."""

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self.normalize is None:
            return self.batches()
        return device_batches(self.batches(), self.device, self.normalize)

    def batches(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The pipeline's batches as DALI hands them out (uint8 on the CPU for dali-cpu)."""
        while True:
            try:
                batch = next(self.iterator)
            except StopIteration:
                return
            except RuntimeError as exc:
                raise _one_line_dali_error(exc, self.files) from None
            images = batch[0]["data"]
            targets = batch[0]["label"].reshape(-1).long()
            if images.shape[0] == 0:
                continue
            if self.nhwc:  # HWC output -> NCHW view with channels_last strides
                images = images.permute(0, 3, 1, 2)
            yield images, targets


def _dali_shard_size(n: int, shard_id: int, num_shards: int) -> int:
    return (n * (shard_id + 1)) // num_shards - (n * shard_id) // num_shards


def _select_files(samples: List[Tuple[str, int]], limit: Any, seed: int) -> Tuple[List[str], List[int]]:
    """Absolute paths and labels of ``samples``, or of the ``limit`` of them drawn with ``seed``."""
    keep = subset_indices(len(samples), limit, seed)
    chosen = samples if keep is None else [samples[i] for i in keep.tolist()]
    return [os.path.abspath(p) for p, _ in chosen], [int(label) for _, label in chosen]


def _pipeline_arguments(cfg: DataConfig, gpu: bool) -> Dict[str, Any]:
    """The arguments of :func:`_create_pipeline` that every pipeline of ``cfg`` shares."""
    device_id = None
    if gpu:
        device = cfg.torch_device
        device_id = device.index if device.type == "cuda" and device.index is not None else torch.cuda.current_device()
    return dict(num_threads=max(1, cfg.workers), device_id=device_id, shard_id=cfg.rank, num_shards=cfg.world_size,
                decoder_device="mixed" if gpu else "cpu", size=cfg.resolved_image_size,
                val_resize=cfg.resolved_val_resize, mean=cfg.info.mean, std=cfg.info.std,
                layout="HWC" if cfg.torch_memory_format == torch.channels_last else "CHW",
                interpolation=cfg.interpolation)


def build_dali_loaders(cfg: DataConfig) -> Loaders:
    """The ``dali-cpu`` / ``dali-gpu`` backends for the ImageNet (ImageFolder) layout."""
    gpu = cfg.backend == "dali-gpu"
    if gpu and not torch.cuda.is_available():
        raise DataError(
            "data backend dali-gpu needs a CUDA GPU, none is available; use --data-backend dali-cpu"
        )
    import_dali()
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy

    train_classes, train_samples = scan_split(cfg.root, "train")
    val_classes, val_samples = scan_split(cfg.root, "val")
    check_same_classes(train_classes, val_classes, str(cfg.root))
    num_classes = resolve_num_classes(cfg, len(train_classes), str(cfg.root))
    train_files, train_labels = _select_files(train_samples, cfg.train_subset, cfg.seed)
    val_files, val_labels = _select_files(val_samples, cfg.val_subset, cfg.seed + 1)
    world, rank = cfg.world_size, cfg.rank
    if len(train_files) < world or len(val_files) < world:
        raise DataError(
            f"{cfg.root}: fewer images than ranks ({len(train_files)} train, {len(val_files)} val, "
            f"{world} ranks)"
        )
    common = _pipeline_arguments(cfg, gpu)
    # dali-cpu hands out uint8 batches, converted and normalised on the training device
    normalize = None if gpu else PixelNormalizer(cfg.info.mean, cfg.info.std, cfg.torch_device, cfg.torch_memory_format)
    on_device: Dict[str, Any] = dict(nhwc=cfg.torch_memory_format == torch.channels_last, normalize=normalize,
                                     device=cfg.torch_device)

    train_bs, val_bs = cfg.batch_size, cfg.resolved_val_batch_size
    smallest_train_shard = len(train_files) // world
    largest_train_shard = -(-len(train_files) // world)
    drop = effective_drop_last(cfg.drop_last, smallest_train_shard, train_bs)
    train_policy = LastBatchPolicy.DROP if drop else LastBatchPolicy.FILL
    train_len = smallest_train_shard // train_bs if drop else -(-largest_train_shard // train_bs)

    def train_loader(seed: int) -> DaliLoader:
        pipe = _create_pipeline(train_files, train_labels, train=True, augment=cfg.augment, batch_size=train_bs,
                                augmentation=cfg.augmentation, seed=seed, **common)
        return DaliLoader(pipe, train_files, train_policy, train_len, **on_device)

    train = train_loader(cfg.seed + 1000 * rank)
    calibration: List[DaliLoader] = []

    def calibration_loader() -> DaliLoader:
        """A second training pipeline for --precise-bn, built on first use (the training iterator cannot be
        rewound mid-epoch, and drawing from it would shorten the next epoch)."""
        if not calibration:
            calibration.append(train_loader(cfg.seed + 1000 * rank + 2))
        return calibration[0]

    val_len = -(-_dali_shard_size(len(val_files), rank, world) // val_bs)
    val_pipe = _create_pipeline(val_files, val_labels, train=False, augment=False, batch_size=val_bs,
                                seed=cfg.seed + 1000 * rank + 1, **common)
    val = DaliLoader(val_pipe, val_files, LastBatchPolicy.PARTIAL, val_len, **on_device)
    return Loaders(train, val, num_classes=num_classes, in_chans=3, image_size=cfg.resolved_image_size,
                   train_samples=len(train_files), val_samples=len(val_files), classes=train_classes,
                   calibration=calibration_loader)
