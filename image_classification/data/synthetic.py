"""``synthetic`` backend: fixed random batches on the target device, for throughput measurements.

Like DeepLearningExamples' synthetic loader, one random batch (standard-normal images, uniform labels) is
generated once per loader and yielded ``length`` times per epoch, so the loader costs nothing.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import torch

from .config import DataConfig, Loaders


class SyntheticLoader:
    """Yields the same ``(images, targets)`` batch ``length`` times per epoch."""

    def __init__(
        self,
        batch_size: int,
        length: int,
        in_chans: int,
        image_size: int,
        num_classes: int,
        device: torch.device,
        memory_format: torch.memory_format,
        seed: int,
    ) -> None:
        generator = torch.Generator().manual_seed(int(seed))
        images = torch.randn(batch_size, in_chans, image_size, image_size, generator=generator)
        targets = torch.randint(0, num_classes, (batch_size,), generator=generator, dtype=torch.int64)
        self.images = images.to(device).contiguous(memory_format=memory_format)
        self.targets = targets.to(device)
        self.length = int(length)
        self.batch_size = int(batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Nothing to reshuffle (kept for the common loader interface)."""

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.length):
            yield self.images, self.targets


def build_synthetic_loaders(cfg: DataConfig) -> Loaders:
    """Synthetic data shaped like ``cfg.dataset`` (size, channels, classes)."""
    size = cfg.resolved_image_size
    chans = cfg.resolved_in_chans
    num_classes = int(cfg.num_classes) if cfg.num_classes is not None else cfg.info.num_classes
    device = cfg.torch_device
    fmt = cfg.torch_memory_format
    seed = cfg.seed + 1000 * cfg.rank
    train = SyntheticLoader(
        cfg.batch_size, cfg.synthetic_train_batches, chans, size, num_classes, device, fmt, seed
    )
    val_bs = cfg.resolved_val_batch_size
    val = SyntheticLoader(val_bs, cfg.synthetic_val_batches, chans, size, num_classes, device, fmt, seed + 1)
    return Loaders(
        train,
        val,
        num_classes=num_classes,
        in_chans=chans,
        image_size=size,
        train_samples=cfg.batch_size * cfg.synthetic_train_batches * cfg.world_size,
        val_samples=val_bs * cfg.synthetic_val_batches * cfg.world_size,
    )
