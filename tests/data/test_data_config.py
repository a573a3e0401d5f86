"""DataConfig validation, backend registry and sharding helpers."""

from __future__ import annotations

import pytest
import torch

from image_classification.data import (
    DataConfig,
    DataError,
    Loaders,
    build_loaders,
    effective_drop_last,
    list_backends,
    list_datasets,
    register_backend,
    resolve_memory_format,
    shard_indices,
    subset_indices,
    unregister_backend,
)


def test_lists() -> None:
    assert {"pytorch", "dali-cpu", "dali-gpu", "synthetic"} <= set(list_backends())
    assert list_datasets() == ["imagenet", "fashion-mnist", "cifar10"]


def test_defaults_per_dataset() -> None:
    assert DataConfig(dataset="imagenet").resolved_image_size == 224
    assert DataConfig(dataset="imagenet").resolved_val_resize == 256
    assert DataConfig(dataset="fashion-mnist").resolved_image_size == 28
    assert DataConfig(dataset="fashion-mnist").resolved_in_chans == 1
    assert DataConfig(dataset="cifar10").resolved_image_size == 32
    assert DataConfig(image_size=128).resolved_val_resize == 146
    assert DataConfig(batch_size=8).resolved_val_batch_size == 8
    assert DataConfig(batch_size=8, val_batch_size=3).resolved_val_batch_size == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backend": "tfrecord"}, "unknown data backend 'tfrecord'"),
        ({"dataset": "mnist"}, "unknown dataset 'mnist'"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"val_batch_size": 0}, "val_batch_size must be >= 1"),
        ({"workers": -1}, "workers must be >= 0"),
        ({"rank": 2, "world_size": 2}, "invalid rank 2 for world size 2"),
        ({"image_size": 4}, "image size must be >= 8"),
        ({"image_size": 224, "val_resize": 200}, "val resize 200 is smaller than the crop size 224"),
        ({"num_classes": 0}, "num_classes must be >= 1"),
        ({"train_subset": 0}, "train_subset must be >= 1"),
        ({"in_chans": 1}, "imagenet supports in_chans 3, got 1"),
        ({"dataset": "fashion-mnist", "in_chans": 2}, "fashion-mnist supports in_chans 1 or 3, got 2"),
        ({"memory_format": "chwn"}, "unknown memory format 'chwn'"),
        ({"dataset": "cifar10", "backend": "dali-cpu"}, "reads JPEG folders only"),
    ],
)
def test_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message) as info:
        build_loaders(DataConfig(root="/nonexistent", **kwargs))
    assert "\n" not in str(info.value)


def test_data_error_is_one_line_value_error() -> None:
    error = DataError("two\nlines   here")
    assert isinstance(error, ValueError)
    assert str(error) == "two lines here"


def test_memory_format() -> None:
    assert resolve_memory_format("nhwc") is torch.channels_last
    assert resolve_memory_format("NCHW") is torch.contiguous_format
    assert resolve_memory_format(torch.channels_last) is torch.channels_last


def test_shard_and_subset_helpers() -> None:
    shards = [list(shard_indices(7, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))
    assert subset_indices(10, None, 0) is None
    assert subset_indices(10, 20, 0) is None
    keep = subset_indices(10, 4, 0)
    assert keep is not None and keep.tolist() == sorted(set(keep.tolist())) and len(keep) == 4
    assert torch.equal(keep, subset_indices(10, 4, 0))
    assert effective_drop_last(True, 10, 4) and not effective_drop_last(True, 3, 4)
    assert not effective_drop_last(False, 10, 4)


def test_register_backend() -> None:
    calls = []

    @register_backend("test-fake")
    def fake(cfg: DataConfig) -> Loaders:
        calls.append(cfg.batch_size)
        return Loaders([], [], num_classes=2, in_chans=3, image_size=8, train_samples=0, val_samples=0)

    try:
        loaders = build_loaders(DataConfig(backend="test-fake", batch_size=5))
        assert calls == [5] and loaders.num_classes == 2
        assert "test-fake" in list_backends()
    finally:  # other tests on this worker list the backends (the loader benchmark times each one)
        unregister_backend("test-fake")
    assert "test-fake" not in list_backends()


def test_a_backend_registered_over_a_built_in_one_is_used_then_removed() -> None:
    from image_classification.data.backends import BACKENDS

    built_in = BACKENDS["synthetic"]

    @register_backend("synthetic")
    def mine(cfg: DataConfig) -> Loaders:
        return Loaders([], [], num_classes=3, in_chans=3, image_size=8, train_samples=0, val_samples=0)

    try:  # the replacement wins, also for a small dataset (whose built-in reader it would otherwise bypass)
        assert build_loaders(DataConfig(backend="synthetic", dataset="cifar10")).num_classes == 3
    finally:
        unregister_backend("synthetic")
    assert BACKENDS["synthetic"] is built_in
    assert build_loaders(DataConfig(backend="synthetic", batch_size=2, synthetic_train_batches=1,
                                    synthetic_val_batches=1)).num_classes == 1000
