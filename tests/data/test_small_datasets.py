"""In-memory Fashion-MNIST (IDX) and CIFAR-10 (pickles): parsing, augmentation, sharding, bad input."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from image_classification.data import DataConfig, DataError, build_loaders
from image_classification.data.small import (
    load_cifar10,
    load_fashion_mnist,
    random_crop,
    random_hflip,
    read_idx,
)

REAL_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def fm_cfg(root: Path, **kwargs: object) -> DataConfig:
    options = dict(dataset="fashion-mnist", root=str(root), batch_size=4, workers=0)
    options.update(kwargs)
    return DataConfig(**options)  # type: ignore[arg-type]


def test_read_fake_fashion_mnist(fashion_mnist_dir: Path) -> None:
    images, labels = load_fashion_mnist(str(fashion_mnist_dir), "train")
    assert images.shape == (20, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.tolist() == [i % 10 for i in range(20)] and labels.dtype == torch.int64
    raw = np.frombuffer(
        gzip.decompress((fashion_mnist_dir / "train-images-idx3-ubyte.gz").read_bytes())[16:], dtype=np.uint8
    ).reshape(20, 28, 28)
    assert np.array_equal(images[:, 0].numpy(), raw)
    images, labels = load_fashion_mnist(str(fashion_mnist_dir), "val")
    assert images.shape == (10, 1, 28, 28)


@pytest.mark.skipif(not os.path.isdir(REAL_FASHION_MNIST), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist() -> None:
    loaders = build_loaders(DataConfig(dataset="fashion-mnist", batch_size=500, workers=0))
    assert (loaders.train_samples, loaders.val_samples) == (60000, 10000)
    assert (loaders.num_classes, loaders.in_chans, loaders.image_size) == (10, 1, 28)
    assert len(loaders.train) == 120 and len(loaders.val) == 20
    images, targets = next(iter(loaders.val))
    assert images.shape == (500, 1, 28, 28) and images.dtype == torch.float32
    assert targets.dtype == torch.int64 and set(targets.tolist()) <= set(range(10))
    # normalised with the dataset mean/std: batch statistics close to (0, 1)
    assert abs(float(images.mean())) < 0.15 and abs(float(images.std()) - 1) < 0.15
    labels = torch.cat([t for _, t in loaders.val])
    assert torch.bincount(labels).tolist() == [1000] * 10


def test_fashion_mnist_loaders(fashion_mnist_dir: Path) -> None:
    loaders = build_loaders(fm_cfg(fashion_mnist_dir, val_batch_size=3))
    assert (loaders.num_classes, loaders.in_chans, loaders.image_size) == (10, 1, 28)
    assert (len(loaders.train), len(loaders.val)) == (5, 4)
    loaders.set_epoch(0)
    for images, targets in loaders.train:
        assert images.shape == (4, 1, 28, 28) and images.dtype == torch.float32
        assert targets.shape == (4,) and targets.dtype == torch.int64
    sizes = [x.shape[0] for x, _ in loaders.val]
    assert sizes == [3, 3, 3, 1]


def test_fashion_mnist_three_channels_and_resize(fashion_mnist_dir: Path) -> None:
    loaders = build_loaders(fm_cfg(fashion_mnist_dir, in_chans=3, image_size=32, memory_format="nhwc"))
    images, _ = next(iter(loaders.val))
    assert images.shape == (4, 3, 32, 32) and loaders.in_chans == 3
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])
    assert images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("memory_format", ["nchw", "nhwc"])
def test_one_channel_batches_have_their_formats_strides(fashion_mnist_dir: Path, memory_format: str) -> None:
    """With one channel NCHW and NHWC strides both pass as contiguous; a batch must still carry its format's own
    strides, or convolution picks channels_last for the stem's weight gradient (whose strides then differ
    from the parameter's: DDP warns 'Grad strides do not match bucket view strides')."""
    fmt = torch.channels_last if memory_format == "nhwc" else torch.contiguous_format
    loaders = build_loaders(fm_cfg(fashion_mnist_dir, memory_format=memory_format))
    for loader in (loaders.train, loaders.val):
        images, _ = next(iter(loader))
        assert images.stride() == torch.empty(images.shape, memory_format=fmt).stride()
    stem = torch.nn.Conv2d(1, 4, 3, padding=1)
    if memory_format == "nhwc":
        stem = stem.to(memory_format=torch.channels_last)
    stem(images).sum().backward()
    assert stem.weight.grad.stride() == stem.weight.stride()


def test_val_is_unaugmented_and_exact(fashion_mnist_dir: Path) -> None:
    raw, labels = load_fashion_mnist(str(fashion_mnist_dir), "val")
    expected = (raw.float() / 255 - 0.2860) / 0.3530
    shards = [build_loaders(fm_cfg(fashion_mnist_dir, rank=r, world_size=3)) for r in range(3)]
    parts = [(torch.cat([x for x, _ in s.val]), torch.cat([y for _, y in s.val])) for s in shards]
    assert [p[0].shape[0] for p in parts] == [4, 3, 3]
    for rank, (images, targets) in enumerate(parts):
        torch.testing.assert_close(images, expected[rank::3])
        assert torch.equal(targets, labels[rank::3])
    assert len({len(s.train) for s in shards}) == 1


def test_train_shards_cover_and_reshuffle(fashion_mnist_dir: Path) -> None:
    def epoch_labels(rank: int, epoch: int) -> list:
        loaders = build_loaders(
            fm_cfg(fashion_mnist_dir, rank=rank, world_size=2, batch_size=5, augment=False)
        )
        loaders.set_epoch(epoch)
        return [int(t) for _, y in loaders.train for t in y]

    first = epoch_labels(0, 0) + epoch_labels(1, 0)
    assert sorted(first) == sorted(i % 10 for i in range(20))  # each sample once per epoch
    assert epoch_labels(0, 0) == epoch_labels(0, 0)
    assert any(epoch_labels(0, e) != epoch_labels(0, 0) for e in (1, 2, 3))


def test_random_crop_and_flip() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    cropped = random_crop(images, 2, generator)
    assert cropped.shape == images.shape and cropped.dtype == torch.uint8
    for src, out in zip(images, cropped):  # each output is a shifted window of the zero-padded input
        padded = torch.nn.functional.pad(src, (2, 2, 2, 2))
        windows = [padded[:, i : i + 6, j : j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(out, w) for w in windows)
    assert torch.equal(random_crop(images, 0, generator), images)
    flipped = random_hflip(images.repeat(32, 1, 1, 1), generator)
    same = [torch.equal(f, images[i % 2]) for i, f in enumerate(flipped)]
    mirrored = [torch.equal(f, images[i % 2].flip(2)) for i, f in enumerate(flipped)]
    assert all(a or b for a, b in zip(same, mirrored)) and any(same) and any(mirrored)


def test_cifar10(cifar10_root: Path) -> None:
    for root in (cifar10_root, cifar10_root / "cifar-10-batches-py"):
        loaders = build_loaders(DataConfig(dataset="cifar10", root=str(root), batch_size=8, workers=0))
        assert (loaders.train_samples, loaders.val_samples) == (30, 10)
        assert (loaders.num_classes, loaders.in_chans, loaders.image_size) == (10, 3, 32)
        assert len(loaders.train) == 3 and len(loaders.val) == 2
        images, targets = next(iter(loaders.train))
        assert images.shape == (8, 3, 32, 32) and targets.dtype == torch.int64
    images, labels = load_cifar10(str(cifar10_root), "val")
    with open(cifar10_root / "cifar-10-batches-py" / "test_batch", "rb") as handle:
        entry = pickle.load(handle, encoding="bytes")
    assert np.array_equal(images.numpy().reshape(10, -1), entry[b"data"])
    assert labels.tolist() == entry[b"labels"]


# ----------------------------------------------------------------------------------------- bad input
def test_fashion_mnist_missing(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_loaders(fm_cfg(tmp_path / "nowhere"))
    (fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="has no t10k-labels-idx1-ubyte.gz"):
        build_loaders(fm_cfg(fashion_mnist_dir))


def test_fashion_mnist_truncated_gzip(fashion_mnist_dir: Path) -> None:
    path = fashion_mnist_dir / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match=f"cannot read {path}: corrupt or truncated"):
        build_loaders(fm_cfg(fashion_mnist_dir))


def test_fashion_mnist_not_gzip(fashion_mnist_dir: Path) -> None:
    path = fashion_mnist_dir / "train-labels-idx1-ubyte.gz"
    path.write_bytes(b"plain text")
    with pytest.raises(DataError, match=f"cannot read {path}"):
        build_loaders(fm_cfg(fashion_mnist_dir))


def test_fashion_mnist_bad_idx(fashion_mnist_dir: Path) -> None:
    path = fashion_mnist_dir / "train-images-idx3-ubyte.gz"
    good = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(good[:-5]))
    with pytest.raises(DataError, match="needs 15696 \\(truncated or corrupt\\)"):
        build_loaders(fm_cfg(fashion_mnist_dir))
    labels = fashion_mnist_dir / "train-labels-idx1-ubyte.gz"
    path.write_bytes(labels.read_bytes())  # labels file where images are expected
    with pytest.raises(DataError, match="magic 0x00000801, expected 0x00000803"):
        build_loaders(fm_cfg(fashion_mnist_dir))


def test_fashion_mnist_count_and_label_checks(
    fashion_mnist_dir: Path, idx_bytes: Callable[[np.ndarray], bytes]
) -> None:
    labels = fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(9, dtype=np.uint8))))
    with pytest.raises(DataError, match="holds 10 images but .* 9 labels"):
        build_loaders(fm_cfg(fashion_mnist_dir))
    labels.write_bytes(gzip.compress(idx_bytes(np.full(10, 12, dtype=np.uint8))))
    with pytest.raises(DataError, match="has label 12, outside 0..9"):
        build_loaders(fm_cfg(fashion_mnist_dir))


def test_read_idx_tiny_file(tmp_path: Path) -> None:
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="is not an IDX file"):
        read_idx(str(path), 0x801)


def test_cifar10_bad_paths(tmp_path: Path, cifar10_root: Path) -> None:
    with pytest.raises(DataError, match="no DATA directory given for cifar10"):
        build_loaders(DataConfig(dataset="cifar10", root=None))
    with pytest.raises(DataError, match="does not exist"):
        build_loaders(DataConfig(dataset="cifar10", root=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is not a CIFAR-10 python directory"):
        build_loaders(DataConfig(dataset="cifar10", root=str(tmp_path / "empty")))
    batch = cifar10_root / "cifar-10-batches-py" / "data_batch_3"
    batch.unlink()
    with pytest.raises(DataError, match=f"CIFAR-10 batch {batch} is missing"):
        build_loaders(DataConfig(dataset="cifar10", root=str(cifar10_root)))


def test_cifar10_corrupt_batches(cifar10_root: Path) -> None:
    batch = cifar10_root / "cifar-10-batches-py" / "data_batch_2"
    good = batch.read_bytes()
    batch.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=f"cannot read CIFAR-10 batch {batch}: corrupt or truncated"):
        build_loaders(DataConfig(dataset="cifar10", root=str(cifar10_root)))
    batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 10), dtype=np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match="expected uint8 \\(N, 3072\\)"):
        build_loaders(DataConfig(dataset="cifar10", root=str(cifar10_root)))
    batch.write_bytes(pickle.dumps({b"labels": [0]}))
    with pytest.raises(DataError, match="lacks 'data' or 'labels'"):
        build_loaders(DataConfig(dataset="cifar10", root=str(cifar10_root)))


def test_small_num_classes(fashion_mnist_dir: Path) -> None:
    assert build_loaders(fm_cfg(fashion_mnist_dir, num_classes=12)).num_classes == 12
    with pytest.raises(DataError, match="num_classes 5 is smaller than the 10 classes of fashion-mnist"):
        build_loaders(fm_cfg(fashion_mnist_dir, num_classes=5))
