"""Data backends: ``build_loaders(DataConfig) -> Loaders``.

Backends (``DataConfig.backend``, the ``--data-backend`` flag)
-------------------------------------------------------------
``pytorch``
    ImageNet layout ``DATA/train/<class>/*.jpg`` and ``DATA/val/<class>/*.jpg`` read with torchvision's
    ImageFolder; train: RandomResizedCrop + horizontal flip, val: resize to ``round(size * 256 / 224)`` +
    center crop; ``workers`` loader processes (kept across epochs) decode (``decode_jpeg`` for JPEGs) and
    transform in uint8 and collate uint8 batches (pinned when ``device`` is CUDA); the float conversion and the
    ImageNet mean/std normalisation run on ``device`` (:mod:`.prefetch`; on CUDA the next batch is copied on a
    side stream while the current one trains). For ``dataset`` ``fashion-mnist`` / ``cifar10`` this backend uses
    the in-memory readers of :mod:`.small` (whole dataset as one uint8 tensor, batched tensor augmentation).
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
    dataset's mean/std, on ``device`` and in ``cfg.memory_format`` for every built-in backend. The trainer
    still does ``images.to(device, non_blocking=True)`` (a no-op when already there) for registered backends.
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

from .backends import (
    BACKENDS,
    build_loaders,
    list_backends,
    list_datasets,
    register_backend,
    unregister_backend,
    validate_config,
)
from .config import (
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SMALL_DATASETS,
    BatchLoader,
    DataConfig,
    DataError,
    DatasetInfo,
    Loaders,
    resolve_memory_format,
    worker_failure,
)
from .sharding import effective_drop_last, shard_indices, subset_indices

__all__ = [
    "BACKENDS",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SMALL_DATASETS",
    "BatchLoader",
    "DataConfig",
    "DataError",
    "DatasetInfo",
    "Loaders",
    "build_loaders",
    "effective_drop_last",
    "list_backends",
    "list_datasets",
    "register_backend",
    "unregister_backend",
    "resolve_memory_format",
    "shard_indices",
    "subset_indices",
    "validate_config",
    "worker_failure",
]
