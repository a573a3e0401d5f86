"""Fixtures generating tiny datasets: an ImageFolder of JPEGs, fake Fashion-MNIST IDX files, CIFAR pickles."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import Callable, Dict, Sequence

import numpy as np
import pytest
from PIL import Image


def write_image_folder(
    root: Path,
    classes: Sequence[str] = ("cat", "dog"),
    per_class: Dict[str, int] | None = None,
    size: int = 40,
    seed: int = 0,
) -> Path:
    """``root/{train,val}/<class>/<i>.jpg`` with random-colour ``size`` x ``size`` JPEGs (4 train, 3 val)."""
    rng = np.random.default_rng(seed)
    per_class = per_class or {"train": 4, "val": 3}
    for split, count in per_class.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = rng.integers(0, 256, size=3)
                pixels = np.clip(base + rng.integers(-20, 20, size=(size, size + 8 * label, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{name}_{i}.jpg", quality=90)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """2 classes x (4 train, 3 val) JPEGs of 40 x 40/48 px."""
    return write_image_folder(tmp_path / "imagenet")


@pytest.fixture
def make_image_folder(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1000))

    def make(**kwargs: object) -> Path:
        return write_image_folder(tmp_path / f"imagenet{next(counter)}", **kwargs)  # type: ignore[arg-type]

    return make


def encode_idx(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array (magic 0x0000 08 ndim, big-endian dims, payload)."""
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def idx_bytes() -> Callable[[np.ndarray], bytes]:
    """The IDX encoder, for tests that write their own IDX files."""
    return encode_idx


def write_fashion_mnist(root: Path, n_train: int = 20, n_val: int = 10, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(encode_idx(images)))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(encode_idx(labels)))
    return root


@pytest.fixture
def fashion_mnist_dir(tmp_path: Path) -> Path:
    """Fake Fashion-MNIST: 20 train / 10 t10k random images, labels ``i % 10``."""
    return write_fashion_mnist(tmp_path / "fashion-mnist")


def write_cifar10(root: Path, per_batch: int = 6, n_test: int = 10, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py/{data_batch_1..5,test_batch}`` pickles in the official dict layout."""
    rng = np.random.default_rng(seed)
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        entry = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in np.arange(n) % 10],
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        with open(directory / name, "wb") as handle:
            pickle.dump(entry, handle)
    return root


@pytest.fixture
def cifar10_root(tmp_path: Path) -> Path:
    """Parent directory holding ``cifar-10-batches-py`` (5 x 6 train, 10 test images)."""
    return write_cifar10(tmp_path / "cifar")
