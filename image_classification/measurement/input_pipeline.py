"""The training input pipeline against the decode limit of this CPU, and how many cores one GPU needs.

Every backend is timed on the same N images of a real ImageFolder (``DATA/train``) as the training loop sees them
(a warm-up epoch, then whole epochs), next to a bare loop in one process that does only what any pipeline must:
read the file, ``torchvision.io.decode_jpeg``, ``RandomResizedCrop`` and a flip on the uint8 image (no float
conversion, normalisation or collation). Throughput per worker (or DALI thread) divided into a model's training
throughput says how many cores a GPU needs to be fed. ``python -m image_classification.tools.loader_benchmark``
prints it; docs/performance.md ("Input pipeline") holds the figures measured here.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from image_classification.data import DataConfig, build_loaders, list_backends
from image_classification.data.imagefolder import scan_split
from image_classification.progress import progress

__all__ = ["LoaderTiming", "bare_decode_limit", "cores_per_gpu", "format_table", "stage_times", "time_backend"]


@dataclass
class LoaderTiming:
    """Images per second of one pipeline (``workers``: its worker processes or DALI threads; 0: the main process)."""

    name: str
    workers: int
    img_s: float
    epochs: List[float] = field(default_factory=list)

    @property
    def per_worker(self) -> float:
        return self.img_s / max(1, self.workers)


def time_backend(root: str, backend: str, workers: int, images: int, batch_size: int, image_size: int,
                 epochs: int = 2, seed: int = 0) -> LoaderTiming:
    """``backend``'s training loader over ``images`` images of ``root`` (drawn with ``seed``): a warm-up epoch (worker
    start-up, DALI's pipeline build), then ``epochs`` timed epochs; the median epoch's images per second."""
    cfg = DataConfig(backend=backend, root=root, batch_size=batch_size, workers=workers, image_size=image_size,
                     train_subset=images, val_subset=batch_size, seed=seed)
    loaders = build_loaders(cfg)
    rates = []
    for epoch in range(epochs + 1):
        loaders.set_epoch(epoch)
        count = 0
        started = time.perf_counter()
        for batch in loaders.train:
            count += int(batch[0].shape[0])
        if epoch > 0:  # epoch 0 warms up
            rates.append(count / (time.perf_counter() - started))
    rates.sort()
    return LoaderTiming(f"{backend} -j {workers}", workers, rates[len(rates) // 2], rates)


def _files(root: str, images: int) -> List[str]:
    _, samples = scan_split(root, "train")
    return [path for path, _ in samples[:images]]


def bare_decode_limit(root: str, images: int, image_size: int, epochs: int = 2) -> LoaderTiming:
    """One process, no loader: read, ``decode_jpeg``, ``RandomResizedCrop`` and flip on uint8 tensors (what any input
    pipeline must do per image); images per second of the median of ``epochs`` passes after a warm-up pass."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms import v2 as T

    crop = T.Compose([T.RandomResizedCrop(image_size, antialias=True), T.RandomHorizontalFlip()])
    files = _files(root, images)
    rates = []
    with warnings.catch_warnings():
        # torchvision 0.29 marks its decoders deprecated (superseded by torchcodec); still the reference here
        warnings.simplefilter("ignore", DeprecationWarning)
        for epoch in range(epochs + 1):
            started = time.perf_counter()
            for path in files:
                crop(decode_jpeg(read_file(path), mode=ImageReadMode.RGB))
            if epoch > 0:
                rates.append(len(files) / (time.perf_counter() - started))
    rates.sort()
    return LoaderTiming("bare decode + crop loop (1 process)", 1, rates[len(rates) // 2], rates)


def stage_times(root: str, images: int, image_size: int) -> Dict[str, float]:
    """Milliseconds per image of the ``pytorch`` backend's stages in one process: PIL decode to RGB, its training
    transform (crop, flip, float32, normalise), and collating a batch of such tensors (per image)."""
    from PIL import Image

    from image_classification.data.imagefolder import imagenet_transforms

    train_transform, _ = imagenet_transforms(DataConfig(dataset="imagenet", image_size=image_size))
    files = _files(root, images)
    decode = transform = 0.0
    tensors = []
    for path in files:
        started = time.perf_counter()
        with open(path, "rb") as handle:
            image = Image.open(handle).convert("RGB")
        middle = time.perf_counter()
        tensors.append(train_transform(image))
        transform += time.perf_counter() - middle
        decode += middle - started
    started = time.perf_counter()
    torch.utils.data.default_collate(tensors)
    collate = time.perf_counter() - started
    n = max(1, len(files))
    return {"decode (PIL)": 1e3 * decode / n, "transform": 1e3 * transform / n, "collate": 1e3 * collate / n}


def cores_per_gpu(model_img_s: float, per_worker_img_s: float) -> float:
    """Worker processes (cores) one GPU needs to be fed at ``model_img_s`` images per second."""
    return model_img_s / per_worker_img_s if per_worker_img_s > 0 else float("inf")


def format_table(timings: Sequence[LoaderTiming], limit: LoaderTiming, model_img_s: Optional[float]) -> List[str]:
    """Markdown: each pipeline's img/s, img/s per worker, its ratio to the bare loop per core, and (with
    ``model_img_s``) the cores one GPU needs."""
    head = ["pipeline", "img/s", "img/s per worker", "per worker / bare loop"]
    if model_img_s:
        head.append(f"cores per GPU at {model_img_s:g} img/s")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for t in [*timings, limit]:
        cells = [t.name, f"{t.img_s:.0f}", f"{t.per_worker:.0f}", f"{t.per_worker / limit.img_s:.2f}x"]
        if model_img_s:
            cells.append(f"{cores_per_gpu(model_img_s, t.per_worker):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def run(root: str, backends: Sequence[str], workers: Sequence[int], images: int, batch_size: int, image_size: int,
        epochs: int = 2) -> List[LoaderTiming]:
    """:func:`time_backend` for every (backend, workers), with a progress line per pipeline."""
    jobs = [(b, w) for b in backends for w in workers]
    return [time_backend(root, b, w, images, batch_size, image_size, epochs)
            for b, w in progress(jobs, "timing input pipelines", unit="pipeline", every_s=5.0)]


def installed_backends() -> List[str]:
    """The backends that read an ImageFolder and can run here (``dali-gpu`` needs CUDA, DALI needs its package)."""
    found = []
    for name in list_backends():
        if name == "synthetic":
            continue
        if name.startswith("dali"):
            try:
                import nvidia.dali  # noqa: F401
            except ImportError:
                continue
            if name == "dali-gpu" and not torch.cuda.is_available():
                continue
        found.append(name)
    return found


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
