"""``pytorch`` backend on a generated ImageFolder of JPEGs: shapes, lengths, sharding, bad input."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Callable, List, Tuple

import pytest
import torch

from image_classification.data import DataConfig, DataError, build_loaders


def cfg(root: Path, **kwargs: object) -> DataConfig:
    options = dict(backend="pytorch", root=str(root), batch_size=4, workers=0, image_size=32)
    options.update(kwargs)
    return DataConfig(**options)  # type: ignore[arg-type]


def collect(loader) -> Tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    pairs = list(loader)
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def test_shapes_and_lengths(image_folder: Path) -> None:
    loaders = build_loaders(cfg(image_folder, val_batch_size=5))
    assert (loaders.num_classes, loaders.in_chans, loaders.image_size) == (2, 3, 32)
    assert loaders.classes == ["cat", "dog"]
    assert (loaders.train_samples, loaders.val_samples) == (8, 6)
    assert (len(loaders.train), len(loaders.val)) == (2, 2)
    loaders.set_epoch(0)
    batches = list(loaders.train)
    assert len(batches) == 2
    for images, targets in batches:
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
        assert targets.shape == (4,) and targets.dtype == torch.int64
    images, targets = collect(loaders.val)
    assert images.shape == (6, 3, 32, 32)
    assert targets.tolist() == [0, 0, 0, 1, 1, 1]
    # normalised with ImageNet mean/std: values well outside [0, 1]
    assert images.min() < -0.5 or images.max() > 1.5


def test_val_transform_matches_resize_center_crop(image_folder: Path) -> None:
    """Validation gives PIL's resize + center crop, normalised: within one 8-bit level (torch's uint8 antialiased
    resize rounds a few pixels differently from PIL's)."""
    from PIL import Image

    loaders = build_loaders(cfg(image_folder, image_size=32))
    images, _ = collect(loaders.val)
    path = sorted((image_folder / "val" / "cat").iterdir())[0]
    expected = _old_pil_pipeline(32, train=False)(Image.open(path).convert("RGB"))
    difference = (images[0] - expected).abs()
    level = 1 / (255 * 0.224)
    assert difference.max() <= level + 1e-5 and difference.mean() <= 0.3 * level


def test_drop_last_and_tiny_shard(image_folder: Path) -> None:
    assert len(build_loaders(cfg(image_folder, batch_size=3)).train) == 2  # 8 // 3
    assert len(build_loaders(cfg(image_folder, batch_size=3, drop_last=False)).train) == 3
    tiny = build_loaders(cfg(image_folder, batch_size=16))  # shard smaller than a batch: kept
    assert len(tiny.train) == 1 and next(iter(tiny.train))[0].shape[0] == 8


def test_epoch_reshuffles_deterministically(image_folder: Path) -> None:
    loaders = build_loaders(cfg(image_folder, batch_size=8, augment=False))

    def order(epoch: int) -> List[int]:
        loaders.set_epoch(epoch)
        images, _ = collect(loaders.train)
        return [int(i) for i in images.flatten(1).sum(1).argsort()]

    assert order(0) == order(0)
    assert any(order(e) != order(0) for e in (1, 2, 3))


def test_val_sharding_is_exact(make_image_folder: Callable[..., Path]) -> None:
    root = make_image_folder(per_class={"train": 3, "val": 5})  # 10 val images over 3 ranks: 4/3/3
    reference, ref_targets = collect(build_loaders(cfg(root)).val)
    shards = [build_loaders(cfg(root, rank=r, world_size=3)) for r in range(3)]
    assert sum(len(s.val) for s in shards) >= 3 and all(s.val_samples == 10 for s in shards)
    parts = [collect(s.val) for s in shards]
    assert [p[0].shape[0] for p in parts] == [4, 3, 3]
    gathered = torch.cat([p[0] for p in parts])
    used = set()
    for image in gathered:
        matches = [i for i in range(len(reference)) if torch.equal(reference[i], image)]
        assert len(matches) == 1 and matches[0] not in used
        used.add(matches[0])
    assert used == set(range(10))
    # train: equal batch counts on all ranks
    assert len({len(s.train) for s in shards}) == 1


def test_subsets(image_folder: Path) -> None:
    loaders = build_loaders(cfg(image_folder, train_subset=5, val_subset=2, batch_size=2))
    assert (loaders.train_samples, loaders.val_samples) == (5, 2)
    assert sum(x.shape[0] for x, _ in loaders.val) == 2


def test_num_classes(image_folder: Path) -> None:
    assert build_loaders(cfg(image_folder, num_classes=10)).num_classes == 10
    with pytest.raises(DataError, match="num_classes 1 is smaller than the 2 classes"):
        build_loaders(cfg(image_folder, num_classes=1))


# ----------------------------------------------------------------------------------------- bad input
def test_missing_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_loaders(cfg(tmp_path / "nope"))
    with pytest.raises(DataError, match="no DATA directory given"):
        build_loaders(DataConfig(backend="pytorch", root=None))


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split(image_folder: Path, split: str) -> None:
    shutil.rmtree(image_folder / split)
    with pytest.raises(DataError, match=f"has no '{split}' folder"):
        build_loaders(cfg(image_folder))


def test_split_without_classes(image_folder: Path) -> None:
    shutil.rmtree(image_folder / "val")
    (image_folder / "val").mkdir()
    with pytest.raises(DataError, match="contains no class folders"):
        build_loaders(cfg(image_folder))


def test_empty_class(image_folder: Path) -> None:
    (image_folder / "train" / "zebra").mkdir()
    (image_folder / "train" / "zebra" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="class folder\\(s\\) without images: zebra"):
        build_loaders(cfg(image_folder))


def test_class_mismatch(image_folder: Path) -> None:
    shutil.move(str(image_folder / "val" / "dog"), str(image_folder / "val" / "wolf"))
    with pytest.raises(DataError, match="train and val class folders differ"):
        build_loaders(cfg(image_folder))


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_named(image_folder: Path, workers: int) -> None:
    bad = image_folder / "val" / "dog" / "dog_1.jpg"
    bad.write_bytes(bad.read_bytes()[:150])  # truncated JPEG
    loaders = build_loaders(cfg(image_folder, workers=workers))
    with pytest.raises(DataError) as info:
        collect(loaders.val)
    message = str(info.value)
    assert message.startswith(f"cannot read image {bad}")
    assert "\n" not in message and "Traceback" not in message


def test_not_an_image_named(image_folder: Path) -> None:
    bad = image_folder / "train" / "cat" / "fake.jpg"
    bad.write_bytes(b"this is text, not a JPEG")
    loaders = build_loaders(cfg(image_folder, batch_size=9))
    with pytest.raises(DataError, match=f"cannot read image {bad}: not a recognised image format"):
        collect(loaders.train)


@pytest.mark.parametrize("workers", [0, 1])
def test_augmentation_is_a_function_of_seed_and_epoch(image_folder: Path, workers: int) -> None:
    loaders = build_loaders(cfg(image_folder, batch_size=8, workers=workers))
    loaders.set_epoch(1)
    torch.manual_seed(123)
    first, _ = collect(loaders.train)
    after_first = torch.get_rng_state()
    torch.manual_seed(456)  # a different caller RNG state must not change the data
    second, _ = collect(loaders.train)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    if workers == 0:  # the caller's RNG stream is not consumed
        torch.manual_seed(123)
        assert torch.equal(torch.get_rng_state(), after_first)
    loaders.set_epoch(2)
    third, _ = collect(loaders.train)
    assert not torch.equal(first, third)


# ----------------------------------------------------------------------------------- symlinks in the tree
def test_scan_matches_torchvision_order(make_image_folder: Callable[..., Path]) -> None:
    from torchvision import datasets

    from image_classification.data.imagefolder import scan_split

    root = make_image_folder()
    nested = root / "train" / "cat" / "sub" / "deeper"
    nested.mkdir(parents=True)
    shutil.copy(next((root / "train" / "cat").glob("*.jpg")), nested / "x.JPG")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    classes, samples = scan_split(str(root), "train")
    expected = datasets.folder.make_dataset(str(root / "train"), {c: i for i, c in enumerate(classes)},
                                            extensions=datasets.folder.IMG_EXTENSIONS)
    assert samples == expected and any(path.endswith("x.JPG") for path, _ in samples)


@pytest.mark.parametrize("target", ["..", "."])
def test_symlink_loop_named(image_folder: Path, target: str) -> None:
    """`ln -s .. D/train/cat/loop` made the scan endless; `ln -s . D/train/cat/self` multiplied the class."""
    link = image_folder / "train" / "cat" / "loop"
    link.symlink_to(target)
    for backend in ("pytorch", "dali-cpu"):
        if backend == "dali-cpu" and importlib.util.find_spec("nvidia.dali") is None:
            continue
        with pytest.raises(DataError) as info:
            build_loaders(cfg(image_folder, backend=backend))
        assert f"symlink loop in the data: {link}" in str(info.value) and "\n" not in str(info.value)


def test_linked_directories_and_files_counted_once(image_folder: Path, tmp_path: Path) -> None:
    cat = image_folder / "train" / "cat"
    before = build_loaders(cfg(image_folder)).train_samples
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(next(cat.glob("*.jpg")), extra / "new.jpg")
    (cat / "link1").symlink_to(extra)
    (cat / "link2").symlink_to(extra)  # the same directory twice
    (cat / "copy.jpg").symlink_to(next(cat.glob("cat*.jpg")))  # a second name for a file already counted
    after = build_loaders(cfg(image_folder)).train_samples
    assert after == before + 1  # only extra/new.jpg is new


def test_killed_worker_is_one_line(image_folder: Path) -> None:
    import os
    import signal

    from torch.utils.data import SequentialSampler

    from image_classification.data.imagefolder import EpochLoader
    from image_classification.data.prefetch import PixelNormalizer

    class Dying(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int):
            os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does to a worker

    loader = EpochLoader(Dying(), SequentialSampler(range(4)), 2, False, workers=1, device=torch.device("cpu"),
                         normalize=PixelNormalizer((0.5,) * 3, (0.5,) * 3), seed=0)
    with pytest.raises(DataError) as info:
        list(loader)
    assert "DataLoader worker" in str(info.value) and "lower -j/--workers (now 1)" in str(info.value)


def test_training_images_of_16_bits_or_floats_load_as_their_8_bit_equal(tmp_path: Path) -> None:
    """load_image (the ImageFolder, DALI check, COCO and ADE20K readers) scales wide pixels instead of clipping them;
    an unknown float scale is stretched with a warning naming the file."""
    import warnings

    import numpy as np
    from PIL import Image

    from image_classification.data.imagefolder import load_image

    eight = np.random.default_rng(1).integers(0, 256, (12, 12)).astype(np.uint8)
    Image.fromarray(eight).save(tmp_path / "eight.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    Image.fromarray(eight.astype(np.float32) / 255).save(tmp_path / "float.tif")
    Image.fromarray(eight.astype(np.float32) * 4).save(tmp_path / "wide.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = np.asarray(load_image(str(tmp_path / "eight.png")))
        for name in ("sixteen.png", "float.tif"):
            assert np.array_equal(np.asarray(load_image(str(tmp_path / name))), expected), name
    with pytest.warns(UserWarning, match=r"wide.tif: float pixels span \[\d+, \d+\].*stretched"):
        load_image(str(tmp_path / "wide.tif"))


# ------------------------------------------------------------------------ uint8 workers, normalised on the device
def _old_pil_pipeline(size: int, train: bool):
    """The backend's transform before the workers produced uint8: PIL image -> PIL crop/resize/flip -> float32 ->
    ImageNet normalisation."""
    from torchvision.transforms import v2 as T

    normalize = [T.ToImage(), T.ToDtype(torch.float32, scale=True),
                 T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    if train:
        return T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(), *normalize])
    return T.Compose([T.Resize(round(size * 256 / 224), antialias=True), T.CenterCrop(size), *normalize])


@pytest.mark.parametrize("workers", [0, 1])
def test_batches_equal_the_float_pipeline_for_the_same_crops(image_folder: Path, workers: int) -> None:
    """The training loop sees the batch the PIL/float32 pipeline gave: same crop windows and flips (each sample's
    RNG seeded from (seed, epoch, index)), values within one 8-bit level (torch's uint8 antialiased resize rounds a
    few pixels differently from PIL's), and exactly (float rounding) the old normalisation of the new uint8 crops."""
    from PIL import Image
    from torchvision.transforms import v2 as T

    from image_classification.data.imagefolder import sample_seed

    loaders = build_loaders(cfg(image_folder, batch_size=8, workers=workers, image_size=24))
    loaders.set_epoch(3)
    train = loaders.train
    [(images, targets)] = list(train)
    [(raw, _)] = list(train.uint8_batches())  # the same epoch again: the same crops
    assert raw.dtype == torch.uint8 and images.dtype == torch.float32 and images.is_contiguous()
    order = list(train.seeded.sampler)
    old = _old_pil_pipeline(24, train=True)
    renormalise = T.Compose(old.transforms[-2:])  # ToDtype + Normalize
    level = 1 / (255 * 0.224)  # one 8-bit level after normalisation (the smallest std)
    for row, index in enumerate(order):
        path, label = train.loader.dataset.samples[index]
        assert targets[row] == label
        torch.default_generator.manual_seed(sample_seed(train.seeded.epoch_seed, index))
        expected = old(Image.open(path).convert("RGB"))
        difference = (images[row] - expected).abs()
        assert difference.max() <= level + 1e-5 and difference.mean() <= 0.3 * level, (row, difference.max())
        torch.testing.assert_close(images[row], renormalise(raw[row]), rtol=1e-6, atol=1e-6)


def test_batches_do_not_depend_on_the_worker_count(image_folder: Path) -> None:
    per_workers = []
    for workers in (0, 2):
        loaders = build_loaders(cfg(image_folder, batch_size=4, workers=workers))
        loaders.set_epoch(5)
        per_workers.append(collect(loaders.train) + collect(loaders.val))
    for a, b in zip(*per_workers):
        assert torch.equal(a, b)


def test_workers_live_across_epochs(image_folder: Path) -> None:
    """Persistent workers: the second epoch reuses the process of the first (no start-up per epoch)."""
    loaders = build_loaders(cfg(image_folder, batch_size=4, workers=1))
    for epoch in (0, 1):
        loaders.set_epoch(epoch)
        collect(loaders.train)
        iterator = loaders.train.loader._iterator
        pids = [w.pid for w in iterator._workers]
        if epoch == 0:
            first = pids
    assert pids == first


def test_channels_last_batches(image_folder: Path) -> None:
    plain = collect(build_loaders(cfg(image_folder)).val)[0]
    nhwc = collect(build_loaders(cfg(image_folder, memory_format="nhwc")).val)[0]
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and torch.equal(plain, nhwc)


def test_read_image_decodes_jpegs_as_pil_does(tmp_path: Path) -> None:
    """decode_jpeg (RGB, greyscale, progressive JPEGs) and the PIL fallback (CMYK JPEG, PNG) give PIL's RGB pixels;
    a truncated JPEG is one line naming the file."""
    import numpy as np
    from PIL import Image

    from image_classification.data.imagefolder import read_image

    pixels = np.random.default_rng(2).integers(0, 256, (20, 28, 3)).astype(np.uint8)
    image = Image.fromarray(pixels)
    files = {"rgb.jpg": (image, {}), "grey.jpg": (image.convert("L"), {}), "cmyk.jpg": (image.convert("CMYK"), {}),
             "progressive.jpg": (image, {"progressive": True}), "png.png": (image, {})}
    for name, (picture, options) in files.items():
        picture.save(tmp_path / name, **options)
        expected = torch.from_numpy(np.array(Image.open(tmp_path / name).convert("RGB"))).permute(2, 0, 1)
        decoded = read_image(str(tmp_path / name))
        assert decoded.dtype == torch.uint8 and torch.equal(decoded, expected), name
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes((tmp_path / "rgb.jpg").read_bytes()[:200])
    with pytest.raises(DataError) as info:
        read_image(str(bad))
    assert str(info.value).startswith(f"cannot read image {bad}: ") and "\n" not in str(info.value)
