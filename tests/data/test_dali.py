"""DALI backends on a generated JPEG folder (dali-cpu runs without a GPU, device_id=None)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Tuple

import pytest
import torch

from image_classification.data import DataConfig, DataError, build_loaders

pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed (pip install nvidia-dali-cuda120)")


def cfg(root: Path, **kwargs: object) -> DataConfig:
    options = dict(backend="dali-cpu", root=str(root), batch_size=4, workers=1, image_size=32)
    options.update(kwargs)
    return DataConfig(**options)  # type: ignore[arg-type]


def collect(loader) -> Tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    pairs = list(loader)
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def test_dali_cpu_shapes_and_lengths(image_folder: Path) -> None:
    loaders = build_loaders(cfg(image_folder, val_batch_size=4))
    assert (loaders.num_classes, loaders.in_chans, loaders.image_size) == (2, 3, 32)
    assert (loaders.train_samples, loaders.val_samples) == (8, 6)
    assert (len(loaders.train), len(loaders.val)) == (2, 2)
    for epoch in range(2):  # auto-reset between epochs
        loaders.set_epoch(epoch)
        batches = list(loaders.train)
        assert len(batches) == 2
        for images, targets in batches:
            assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
            assert images.device.type == "cpu"
            assert targets.shape == (4,) and targets.dtype == torch.int64
            assert set(targets.tolist()) <= {0, 1}
        images, targets = collect(loaders.val)
        assert images.shape == (6, 3, 32, 32)
        assert targets.tolist() == [0, 0, 0, 1, 1, 1]


def test_dali_val_close_to_pytorch_backend(image_folder: Path) -> None:
    dali_images, dali_targets = collect(build_loaders(cfg(image_folder)).val)
    torch_images, torch_targets = collect(build_loaders(cfg(image_folder, backend="pytorch", workers=0)).val)
    assert torch.equal(dali_targets, torch_targets)
    # same normalisation and geometry; only the resampling kernels differ
    assert float((dali_images - torch_images).abs().mean()) < 0.1


def test_dali_cpu_val_batch_equals_dalis_own_normalisation(image_folder: Path) -> None:
    """dali-cpu hands out uint8 and normalises on the training device: the batch the loop sees equals the one
    DALI's float ``crop_mirror_normalize`` gave before (float rounding), and its values are uint8 levels."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    images, _ = collect(build_loaders(cfg(image_folder, val_batch_size=6)).val)
    files = sorted(str(p.resolve()) for p in (image_folder / "val").glob("*/*.jpg"))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

    @pipeline_def(batch_size=6, num_threads=1, device_id=None, seed=0)
    def float_pipeline():  # noqa: ANN202
        jpegs, labels = fn.readers.file(files=files, labels=[0] * len(files), name="Reader")
        decoded = fn.resize(fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), resize_shorter=37,
                            interp_type=types.INTERP_LINEAR, antialias=True)
        return fn.crop_mirror_normalize(decoded, dtype=types.FLOAT, output_layout="CHW", crop=(32, 32),
                                        mean=[255 * m for m in mean], std=[255 * s for s in std]), labels

    pipe = float_pipeline()
    pipe.build()
    expected = next(iter(DALIGenericIterator([pipe], ["data", "label"], reader_name="Reader")))[0]["data"]
    torch.testing.assert_close(images, expected, rtol=1e-6, atol=1e-5)
    pixels = images * torch.tensor(std).view(1, 3, 1, 1) * 255 + torch.tensor(mean).view(1, 3, 1, 1) * 255
    torch.testing.assert_close(pixels, pixels.round(), rtol=0, atol=1e-3)


def test_dali_nhwc(image_folder: Path) -> None:
    loaders = build_loaders(cfg(image_folder, memory_format="nhwc"))
    images, _ = next(iter(loaders.val))
    assert images.shape == (4, 3, 32, 32) and images.is_contiguous(memory_format=torch.channels_last)
    reference, _ = next(iter(build_loaders(cfg(image_folder)).val))
    torch.testing.assert_close(images, reference)


def test_dali_val_sharding_is_exact(make_image_folder: Callable[..., Path]) -> None:
    root = make_image_folder(per_class={"train": 5, "val": 5})  # 10 val images, 3 ranks
    reference, _ = collect(build_loaders(cfg(root)).val)
    shards = [build_loaders(cfg(root, rank=r, world_size=3)) for r in range(3)]
    parts = [collect(s.val) for s in shards]
    assert sum(p[0].shape[0] for p in parts) == 10
    assert [len(s.val) for s in shards] == [-(-p[0].shape[0] // 4) for p in parts]
    used = set()
    for image in torch.cat([p[0] for p in parts]):
        distances = (reference - image).abs().flatten(1).amax(1)
        index = int(distances.argmin())
        assert float(distances[index]) < 1e-5 and index not in used
        used.add(index)
    assert used == set(range(10))
    # every rank runs the same number of train batches (DDP would hang otherwise)
    counts = [len(list(s.train)) for s in shards]
    assert counts == [len(s.train) for s in shards] and len(set(counts)) == 1


def test_dali_train_without_drop_last(image_folder: Path) -> None:
    loaders = build_loaders(cfg(image_folder, batch_size=3, drop_last=False))
    assert len(loaders.train) == 3
    assert sum(1 for _ in loaders.train) == 3
    tiny = build_loaders(cfg(image_folder, batch_size=16))  # shard smaller than one batch: kept
    assert len(tiny.train) == 1 and sum(1 for _ in tiny.train) == 1


def test_dali_corrupt_image_named(image_folder: Path) -> None:
    bad = image_folder / "val" / "dog" / "dog_1.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a complete jpeg")
    with pytest.raises(DataError) as info:
        collect(build_loaders(cfg(image_folder)).val)
    assert str(info.value).startswith(f"cannot decode image {bad}") and "\n" not in str(info.value)


def test_dali_bad_folders(tmp_path: Path, image_folder: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_loaders(cfg(tmp_path / "missing"))
    (image_folder / "val" / "dog").rename(image_folder / "val" / "wolf")
    with pytest.raises(DataError, match="train and val class folders differ"):
        build_loaders(cfg(image_folder))


def test_dali_gpu_without_cuda(image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DataError, match="dali-gpu needs a CUDA GPU, none is available"):
        build_loaders(cfg(image_folder, backend="dali-gpu"))


def test_dali_missing(image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(DataError, match="pip install nvidia-dali-cuda120"):
        build_loaders(cfg(image_folder))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dali_gpu(image_folder: Path) -> None:
    loaders = build_loaders(cfg(image_folder, backend="dali-gpu", device="cuda"))
    images, targets = next(iter(loaders.train))
    assert images.is_cuda and images.shape == (4, 3, 32, 32) and targets.dtype == torch.int64
    gpu_val, _ = collect(loaders.val)
    cpu_val, _ = collect(build_loaders(cfg(image_folder)).val)
    assert float((gpu_val.cpu() - cpu_val).abs().mean()) < 0.05


def test_dali_empty_file_named(image_folder: Path) -> None:
    """DALI reports "File mapping failed: <path>"; the noise filter keeps that line, so the error names the file."""
    empty = image_folder / "train" / "cat" / "zero.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as info:
        loaders = build_loaders(cfg(image_folder))
        collect(loaders.train)
    assert f"image {empty} is empty (0 bytes)" in str(info.value) and "\n" not in str(info.value)


def test_dali_calibration_batches_leave_the_training_stream_alone(image_folder: Path) -> None:
    loaders = build_loaders(cfg(image_folder, batch_size=2))
    calibration = list(zip(range(2), loaders.calibration_batches()))
    assert len(calibration) == 2 and calibration[0][1][0].shape == (2, 3, 32, 32)
    assert sum(1 for _ in loaders.train) == len(loaders.train)  # a full epoch: nothing was drawn from it


def test_dali_train_crop_draws_random_resized_crop_windows(tmp_path: Path) -> None:
    """The training pipeline decodes only the crop window (decoders.image_random_crop, as DeepLearningExamples') and
    resizes it: the windows must cover 8-100 % of the image with a width/height ratio in [3/4, 4/3], as
    random_resized_crop's did. The image encodes its coordinates (red = column, green = row), so each output's corners
    give its window."""
    import numpy as np
    from PIL import Image

    height, width = 120, 160
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs * 255 / (width - 1), ys * 255 / (height - 1), np.zeros_like(xs)], -1).round().astype(np.uint8)
    for label in ("a", "b"):
        (tmp_path / "train" / label).mkdir(parents=True)
        (tmp_path / "val" / label).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(pixels).save(tmp_path / "train" / label / f"{i}.png")
        Image.fromarray(pixels).save(tmp_path / "val" / label / "0.png")
    loaders = build_loaders(cfg(tmp_path, batch_size=8, image_size=32, interpolation="nearest"))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    areas, aspects = [], []
    for epoch in range(4):
        loaders.set_epoch(epoch)
        for images, _ in loaders.train:
            raw = images * std + mean  # back to 0..255
            red, green = raw[:, 0], raw[:, 1]
            # nearest-neighbour corners: first/last column and row of the window (a mirror swaps the columns)
            cols = (red[:, :, -1] - red[:, :, 0]).abs().mean(1) / 255 * (width - 1) + 1
            rows = (green[:, -1, :] - green[:, 0, :]).mean(1) / 255 * (height - 1) + 1
            areas += (cols * rows / (width * height)).tolist()
            aspects += (cols / rows).tolist()
    assert len(areas) == 64
    assert min(areas) > 0.08 * 0.8 and max(areas) <= 1.0 + 1e-6, (min(areas), max(areas))
    assert min(aspects) > 0.75 * 0.85 and max(aspects) < (4 / 3) * 1.15, (min(aspects), max(aspects))
    assert max(areas) - min(areas) > 0.3  # random windows, not one fixed crop
