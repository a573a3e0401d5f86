"""Synthetic backend: shapes, class range, epoch length, memory format."""

from __future__ import annotations

import pytest
import torch

from image_classification.data import DataConfig, build_loaders


@pytest.mark.parametrize(
    "dataset, chans, size, classes",
    [("imagenet", 3, 224, 1000), ("fashion-mnist", 1, 28, 10), ("cifar10", 3, 32, 10)],
)
def test_synthetic_shapes(dataset: str, chans: int, size: int, classes: int) -> None:
    loaders = build_loaders(
        DataConfig(
            backend="synthetic",
            dataset=dataset,
            batch_size=3,
            val_batch_size=2,
            synthetic_train_batches=4,
            synthetic_val_batches=2,
            world_size=2,
            rank=1,
        )
    )
    assert (loaders.num_classes, loaders.in_chans, loaders.image_size) == (classes, chans, size)
    assert len(loaders.train) == 4 and len(loaders.val) == 2
    assert loaders.train_samples == 3 * 4 * 2 and loaders.val_samples == 2 * 2 * 2
    batches = list(loaders.train)
    assert len(batches) == 4
    images, targets = batches[0]
    assert images.shape == (3, chans, size, size) and images.dtype == torch.float32
    assert targets.shape == (3,) and targets.dtype == torch.int64
    assert 0 <= int(targets.min()) and int(targets.max()) < classes
    images, targets = next(iter(loaders.val))
    assert images.shape == (2, chans, size, size)


def test_synthetic_options() -> None:
    loaders = build_loaders(
        DataConfig(
            backend="synthetic",
            batch_size=2,
            image_size=64,
            num_classes=5,
            in_chans=1,
            memory_format="nhwc",
            synthetic_train_batches=1,
        )
    )
    images, targets = next(iter(loaders.train))
    assert images.shape == (2, 1, 64, 64)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert int(targets.max()) < 5 and loaders.num_classes == 5
