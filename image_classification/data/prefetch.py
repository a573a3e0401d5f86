"""8-bit batches to normalised float batches on the training device, the next batch copied while this one trains.

The ``pytorch`` backend's workers decode, crop and flip in uint8 and collate uint8 batches (a quarter of the bytes
of float32 through the workers' shared memory, the pinned buffer and the host-to-device copy); the conversion to
float, the ImageNet normalisation and the channels-last layout happen here, in ONE pass on the device
(:class:`PixelNormalizer`). On CUDA :func:`device_batches` issues the next batch's copy and conversion on a side
stream before handing out the current one, so they overlap the step that trains on it, as DeepLearningExamples'
``PrefetchedWrapper`` and timm's ``PrefetchLoader`` do. On the CPU the same conversion runs in the main process.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence, Tuple

import torch

__all__ = ["PixelNormalizer", "device_batches"]

Batch = Tuple[torch.Tensor, torch.Tensor]


class PixelNormalizer:
    """uint8 images (N x C x H x W, pixels 0..255) -> float32 ``(pixel / 255 - mean) / std`` in ``memory_format``.

    Computed as ``pixel * (1 / (255 std)) + (-mean / std)``: the same values as ``ToDtype(scale=True)`` then
    ``Normalize`` up to float rounding. ``fused`` (the default on CUDA): ONE multiply-add that reads the 8-bit
    batch once and writes the float batch once, already in the requested layout. On the CPU, where a mixed-dtype
    broadcast runs unvectorised (2.8 vs 1.8 ms for 32 images of 224 px on one core), it converts, then scales
    and shifts in place, then changes the layout if asked.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu",
                 memory_format: torch.memory_format = torch.contiguous_format, fused: bool | None = None) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels, std {len(std)}")
        mean64 = torch.tensor([float(m) for m in mean], dtype=torch.float64)
        std64 = torch.tensor([float(s) for s in std], dtype=torch.float64)
        # computed in float64, rounded once: the closest float32 factors of the two-step formula
        self.scale = (1.0 / (255.0 * std64)).to(torch.float32).view(1, -1, 1, 1).to(device)
        self.bias = (-mean64 / std64).to(torch.float32).view(1, -1, 1, 1).to(device)
        self.memory_format = memory_format
        self.fused = torch.device(device).type == "cuda" if fused is None else bool(fused)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"PixelNormalizer takes uint8 images, got {images.dtype}")
        if images.shape[1] != self.scale.shape[1]:
            raise ValueError(f"images have {images.shape[1]} channels, the normalisation {self.scale.shape[1]}")
        if self.fused:
            out = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=self.memory_format)
            return torch.addcmul(self.bias, images, self.scale, out=out)
        return images.float().mul_(self.scale).add_(self.bias).contiguous(memory_format=self.memory_format)


def device_batches(batches: Iterable[Batch], device: torch.device, normalize: PixelNormalizer) -> Iterator[Batch]:
    """``(uint8 images, targets)`` from ``batches`` (on the CPU; pinned when ``device`` is CUDA) as ``(normalised
    float images, targets)`` on ``device``.

    On CUDA the copy and conversion of batch k + 1 are queued on a side stream before batch k is handed out, so
    they run while batch k trains; the compute stream waits for them only when it reaches batch k + 1, and the
    tensors are recorded on it so the caching allocator does not reuse their memory early.
    """
    if device.type != "cuda":
        for images, targets in batches:
            yield normalize(images.to(device)), targets.to(device)
        return
    stream = torch.cuda.Stream(device)
    compute = torch.cuda.current_stream(device)
    pending: Batch | None = None
    for images, targets in batches:
        with torch.cuda.stream(stream):
            ready = (normalize(images.to(device, non_blocking=True)), targets.to(device, non_blocking=True))
        if pending is not None:
            yield pending
        compute.wait_stream(stream)
        for tensor in ready:
            tensor.record_stream(compute)
        pending = ready
    if pending is not None:
        yield pending
