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
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from image_classification.data import DataConfig, build_loaders, list_backends
from image_classification.data.imagefolder import scan_split
from image_classification.progress import progress

__all__ = ["LoaderTiming", "bare_decode_limit", "cores_per_gpu", "format_feed_table", "format_table", "stage_times",
           "time_backend", "time_training_feed", "write_sample_jpegs"]


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
    start-up, DALI's pipeline build), then ``epochs`` timed epochs; the median epoch's images per second in the
    steady state: each epoch is timed from its first batch to its last, leaving out the first batch, which carries
    the pipeline's fill (a few batches of an epoch of hundreds here; one of thousands on ImageNet)."""
    cfg = DataConfig(backend=backend, root=root, batch_size=batch_size, workers=workers, image_size=image_size,
                     train_subset=images, val_subset=batch_size, seed=seed)
    loaders = build_loaders(cfg)
    rates = []
    for epoch in range(epochs + 1):
        loaders.set_epoch(epoch)
        count, started = -1, 0.0
        for batch in loaders.train:
            if count < 0:
                count, started = 0, time.perf_counter()
            else:
                count += int(batch[0].shape[0])
        if epoch > 0 and count > 0:  # epoch 0 warms up
            rates.append(count / (time.perf_counter() - started))
    if not rates:
        raise ValueError(f"{images} image(s) make one batch of {batch_size} or fewer: give --images several batches")
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
    """Milliseconds per image of the ``pytorch`` backend's stages in one process: reading and decoding
    (:func:`~image_classification.data.imagefolder.read_image`), its uint8 training transform (crop, flip), collating
    the uint8 tensors, and the float conversion + normalisation (on the CPU here; a CUDA run does it on the GPU);
    with PIL's decode to RGB of the same files for comparison."""
    from PIL import Image

    from image_classification.data.imagefolder import imagenet_normalizer, imagenet_transforms, read_image

    cfg = DataConfig(dataset="imagenet", image_size=image_size)
    train_transform, _ = imagenet_transforms(cfg)
    files = _files(root, images)
    totals = dict.fromkeys(("decode", "transform (uint8)", "collate", "normalise", "PIL decode"), 0.0)
    tensors = []
    for path in files:
        started = time.perf_counter()
        image = read_image(path)
        middle = time.perf_counter()
        tensors.append(train_transform(image))
        ended = time.perf_counter()
        with open(path, "rb") as handle:
            Image.open(handle).convert("RGB")
        totals["PIL decode"] += time.perf_counter() - ended
        totals["decode"] += middle - started
        totals["transform (uint8)"] += ended - middle
    started = time.perf_counter()
    batch = torch.utils.data.default_collate(tensors)
    middle = time.perf_counter()
    imagenet_normalizer(cfg)(batch)
    totals["collate"] = middle - started
    totals["normalise"] = time.perf_counter() - middle
    n = max(1, len(files))
    return {name: 1e3 * seconds / n for name, seconds in totals.items()}


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


def write_sample_jpegs(root: str, images: int, classes: int = 8, size: Tuple[int, int] = (500, 375),
                       seed: int = 0) -> int:
    """Write an ImageFolder of ``images`` training JPEGs (and ``images // 8`` validation ones, at least one per class)
    in ``classes`` classes under ``root``, for machines without a dataset (the GPU checks): ``size`` (width, height)
    is ImageNet's typical 500 x 375 and the content a smooth random field plus noise, which gives photographs' file
    size (about 85 KB at quality 90) and decoding cost; random pixels would make 3-4x larger files. Returns the
    number of files written."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    written = 0
    for split, count in (("train", images), ("val", max(classes, images // 8))):
        for i in progress(range(count), f"writing {split} sample JPEGs to {root}", unit="image", every_s=5.0):
            folder = os.path.join(root, split, f"class{i % classes:03d}")
            os.makedirs(folder, exist_ok=True)
            low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
            field = low.resize(size, Image.Resampling.BICUBIC)
            pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 14, (size[1], size[0], 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                os.path.join(folder, f"{i:06d}.jpg"), quality=90)
            written += 1
    return written


def time_training_feed(root: Optional[str], backend: str, workers: int, arch: str, images: int, batch_size: int,
                       image_size: int, device: torch.device, seconds: float, seed: int = 0) -> LoaderTiming:
    """Images per second of ``arch``'s training step (SGD; on CUDA AMP fp16 with a GradScaler and channels-last, as
    ``main.py --amp --memory-format nhwc`` trains) fed by ``backend`` over ``images`` images of ``root`` (the
    ``synthetic`` backend: tensors already on the device, the step's own limit). A warm-up epoch, then epochs
    until ``seconds`` have passed, each timed from its first batch to its last synchronised step (as
    :func:`time_backend`); 1000 classes for every backend, so the steps are the same."""
    from image_classification.models import build_model

    from .latency import sgd_step

    cuda = device.type == "cuda"
    cfg = DataConfig(backend=backend, root=root if backend != "synthetic" else None, batch_size=batch_size,
                     workers=workers, image_size=image_size, device=str(device), num_classes=1000,
                     memory_format="nhwc" if cuda else "nchw", seed=seed,
                     train_subset=images if backend != "synthetic" else None, val_subset=batch_size,
                     synthetic_train_batches=max(2, images // batch_size), synthetic_val_batches=1)
    loaders = build_loaders(cfg)
    model = build_model(arch, num_classes=1000).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    amp = "fp16" if cuda else "none"

    count, elapsed, epoch = 0, 0.0, 0
    while epoch == 0 or elapsed < seconds:
        loaders.set_epoch(epoch)
        seen, started = -1, 0.0
        for x, y in loaders.train:
            if seen < 0 and cuda:
                torch.cuda.synchronize(device)
            if seen < 0:
                seen, started = 0, time.perf_counter()
            else:
                seen += int(x.shape[0])
            sgd_step(model, optimizer, x.to(device, non_blocking=True), y.to(device, non_blocking=True), amp=amp,
                     scaler=scaler)()
        if cuda:
            torch.cuda.synchronize(device)
        if epoch > 0 and seen > 0:  # epoch 0 warms up (workers, cuDNN's algorithm search)
            count, elapsed = count + seen, elapsed + time.perf_counter() - started
        epoch += 1
        if epoch > 1 and count == 0:
            raise ValueError(f"{images} image(s) make one batch of {batch_size} or fewer: "
                             "give --images several batches")
    name = "synthetic (on the device)" if backend == "synthetic" else f"{backend} -j {workers}"
    return LoaderTiming(name, workers, count / elapsed)


def format_feed_table(arch: str, feeds: Sequence[LoaderTiming], synthetic: LoaderTiming) -> List[str]:
    """Markdown: each pipeline's training img/s feeding ``arch`` and its ratio to synthetic data (1.00 = not
    data-bound)."""
    lines = [f"| pipeline feeding a {arch} training step | img/s | of synthetic data |", "| --- | --- | --- |"]
    for t in [*feeds, synthetic]:
        lines.append(f"| {t.name} | {t.img_s:.0f} | {t.img_s / synthetic.img_s:.2f} |")
    return lines


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
