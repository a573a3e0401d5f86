"""--augmentation (AutoAugment / RandAugment / TrivialAugment) and --interpolation on every data backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from image_classification.data import DataConfig, DataError, build_loaders
from image_classification.data.augment import AUGMENTATIONS, torchvision_augmentation
from image_classification.data.imagefolder import imagenet_transforms

POLICIES = [name for name in AUGMENTATIONS if name != "none"]


def _first_train_batch(**kwargs: object) -> torch.Tensor:
    loaders = build_loaders(DataConfig(**kwargs))  # type: ignore[arg-type]
    loaders.set_epoch(0)
    return next(iter(loaders.train))[0]


@pytest.mark.parametrize("name, kind", [("autoaugment", v2.AutoAugment), ("randaugment", v2.RandAugment),
                                        ("trivialaugment", v2.TrivialAugmentWide)])
def test_policies_are_torchvisions(name: str, kind: type) -> None:
    policy = torchvision_augmentation(name)
    assert isinstance(policy, kind)
    if name == "autoaugment":
        assert policy.policy == v2.AutoAugmentPolicy.IMAGENET
        assert torchvision_augmentation(name, "cifar10").policy == v2.AutoAugmentPolicy.CIFAR10
    if name == "randaugment":
        assert (policy.num_ops, policy.magnitude) == (2, 9)
    assert torchvision_augmentation("none") is None


def test_imagefolder_transforms_use_the_policy_and_the_filter(image_folder: Path) -> None:
    cfg = DataConfig(root=str(image_folder), augmentation="autoaugment", interpolation="bicubic", image_size=32)
    train, val = imagenet_transforms(cfg)
    crop, flip, policy = train.transforms[:3]
    assert isinstance(crop, v2.RandomResizedCrop) and crop.interpolation == InterpolationMode.BICUBIC
    assert isinstance(flip, v2.RandomHorizontalFlip) and isinstance(policy, v2.AutoAugment)  # after crop and flip
    assert val.transforms[0].interpolation == InterpolationMode.BICUBIC
    assert not any(isinstance(t, v2.AutoAugment) for t in val.transforms)


@pytest.mark.parametrize("name", POLICIES)
def test_imagefolder_augmentation_is_seeded_and_train_only(image_folder: Path, name: str) -> None:
    common = dict(backend="pytorch", root=str(image_folder), batch_size=8, workers=0, image_size=32, seed=1)
    plain = _first_train_batch(**common)
    augmented = _first_train_batch(**common, augmentation=name)
    assert augmented.shape == plain.shape and not torch.equal(augmented, plain)
    assert torch.equal(augmented, _first_train_batch(**common, augmentation=name))  # a function of (seed, epoch)
    val = next(iter(build_loaders(DataConfig(**common, augmentation=name)).val))[0]
    assert torch.equal(val, next(iter(build_loaders(DataConfig(**common)).val))[0])


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10"])
def test_in_memory_augmentation_per_sample_and_seeded(dataset: str, fashion_mnist_dir: Path,
                                                       cifar10_root: Path) -> None:
    root = str(fashion_mnist_dir if dataset == "fashion-mnist" else cifar10_root)
    common = dict(backend="pytorch", dataset=dataset, root=root, batch_size=8, seed=2)
    plain = _first_train_batch(**common)
    state = torch.get_rng_state()
    augmented = _first_train_batch(**common, augmentation="trivialaugment")
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    assert augmented.shape == plain.shape and not torch.equal(augmented, plain)
    changed = [not torch.equal(a, p) for a, p in zip(augmented, plain)]
    assert 0 < sum(changed)  # each image draws its own operation (identity is one of them)
    assert torch.equal(augmented, _first_train_batch(**common, augmentation="trivialaugment"))


def test_interpolation_of_the_in_memory_resize(fashion_mnist_dir: Path) -> None:
    common = dict(backend="pytorch", dataset="fashion-mnist", root=str(fashion_mnist_dir), batch_size=10,
                  image_size=40)
    images = {mode: next(iter(build_loaders(DataConfig(**common, interpolation=mode)).val))[0]
              for mode in ("bilinear", "bicubic", "nearest")}
    assert not torch.equal(images["bilinear"], images["bicubic"])
    pixels = images["bicubic"] * 0.3530 + 0.2860
    assert float(pixels.min()) >= -1e-6 and float(pixels.max()) <= 1 + 1e-6  # bicubic overshoot clamped
    # nearest copies source pixels: every value is one of the 256 grey levels
    levels = (images["nearest"] * 0.3530 + 0.2860) * 255
    assert torch.allclose(levels, levels.round(), atol=1e-3)


def test_unknown_names_are_data_errors(image_folder: Path) -> None:
    with pytest.raises(DataError, match="unknown augmentation 'mixup'"):
        build_loaders(DataConfig(root=str(image_folder), augmentation="mixup"))
    with pytest.raises(DataError, match="unknown interpolation 'lanczos'"):
        build_loaders(DataConfig(root=str(image_folder), interpolation="lanczos"))


def test_synthetic_ignores_augmentation() -> None:
    batch = _first_train_batch(backend="synthetic", batch_size=2, image_size=16, augmentation="autoaugment")
    assert torch.equal(batch, _first_train_batch(backend="synthetic", batch_size=2, image_size=16))


def test_loaders_report_their_normalisation(image_folder: Path, fashion_mnist_dir: Path) -> None:
    imagenet = build_loaders(DataConfig(root=str(image_folder), workers=0))
    assert (imagenet.mean, imagenet.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    gray3 = build_loaders(DataConfig(dataset="fashion-mnist", root=str(fashion_mnist_dir), in_chans=3))
    assert (gray3.mean, gray3.std) == ((0.2860,) * 3, (0.3530,) * 3)


class TestDali:
    @pytest.fixture(autouse=True)
    def _dali(self) -> None:
        pytest.importorskip("nvidia.dali", reason="nvidia-dali not installed")

    @pytest.mark.parametrize("name", POLICIES)
    def test_dali_policies_run_and_change_the_training_images(self, image_folder: Path, name: str,
                                                              recwarn: pytest.WarningsRecorder) -> None:
        common = dict(backend="dali-cpu", root=str(image_folder), batch_size=8, workers=1, image_size=32, seed=3)
        plain = _first_train_batch(**common)
        augmented = _first_train_batch(**common, augmentation=name)
        assert augmented.shape == plain.shape == (8, 3, 32, 32) and augmented.dtype == torch.float32
        assert not torch.equal(augmented, plain)
        assert not [w for w in recwarn if "is now deprecated" in str(w.message)]  # DALI's own noise is hidden

    def test_dali_interpolation_matches_the_pytorch_backend(self, tmp_path: Path) -> None:
        for split in ("train", "val"):  # smooth images: the filters differ in a measurable way
            for label in ("a", "b"):
                (tmp_path / split / label).mkdir(parents=True)
                for i in range(3):
                    y, x = np.mgrid[0:48, 0:56] / 48.0
                    pixels = np.stack([np.sin(6 * x + i) * 0.5 + 0.5, np.cos(5 * y) * 0.5 + 0.5, x * y / 1.2], -1)
                    Image.fromarray((pixels * 255).astype(np.uint8)).save(tmp_path / split / label / f"{i}.png")

        def val(backend: str, mode: str) -> torch.Tensor:
            cfg = DataConfig(backend=backend, root=str(tmp_path), batch_size=6, workers=1 if "dali" in backend
                             else 0, image_size=32, interpolation=mode)
            return next(iter(build_loaders(cfg).val))[0]

        dali = {mode: val("dali-cpu", mode) for mode in ("bilinear", "bicubic", "nearest")}
        assert not torch.equal(dali["bicubic"], dali["bilinear"]) and not torch.equal(dali["nearest"], dali["bilinear"])
        # the filters reach DALI's resize: its nearest-neighbour output is closest to torchvision's (DALI and
        # torchvision crop on slightly different grids, which dominates the linear/cubic comparison)
        reference = val("pytorch", "nearest")
        distance = {mode: float((images - reference).abs().mean()) for mode, images in dali.items()}
        assert min(distance, key=distance.get) == "nearest"
