"""Automatic augmentation policies and resampling filters shared by the data backends.

``--augmentation`` (``DataConfig.augmentation``) adds one learned or random augmentation policy to the
training images, after the random resized crop and the flip, on 8-bit images (as EfficientNet's
preprocessing applies AutoAugment):

``autoaugment``
    AutoAugment (Cubuk et al., CVPR 2019) with its ImageNet policy (its CIFAR-10 policy for ``cifar10``).
``randaugment``
    RandAugment (Cubuk et al., 2020): 2 operations per image at magnitude 9 of 31 bins.
``trivialaugment``
    TrivialAugment Wide (Mueller & Hutter, ICCV 2021): one operation at a uniformly drawn magnitude.

The ``pytorch`` backend (JPEG folders and the in-memory Fashion-MNIST / CIFAR-10 readers) uses
``torchvision.transforms.v2``; the DALI backends use DALI's own implementations
(``nvidia.dali.auto_aug``), which follow the same papers but are not bit-identical to torchvision's.

``--interpolation`` (``DataConfig.interpolation``) is the resampling filter of the train crop resize and of
the validation resize (``bilinear`` by default; EfficientNet uses ``bicubic``).
"""

from __future__ import annotations

from typing import Callable, Optional

__all__ = ["AUGMENTATIONS", "INTERPOLATIONS", "torchvision_augmentation", "torchvision_interpolation",
           "torch_interpolate_mode"]

AUGMENTATIONS = ("none", "autoaugment", "randaugment", "trivialaugment")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")

RANDAUGMENT_OPS = 2  # torchvision's and the RandAugment paper's ImageNet default N
RANDAUGMENT_MAGNITUDE = 9  # of 31 magnitude bins (torchvision's default)


def torchvision_interpolation(name: str):
    """The ``torchvision.transforms.InterpolationMode`` of ``name``."""
    from torchvision.transforms import InterpolationMode

    return {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
            "nearest": InterpolationMode.NEAREST}[name]


def torch_interpolate_mode(name: str) -> str:
    """The ``torch.nn.functional.interpolate`` mode of ``name``."""
    return {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}[name]


def torchvision_augmentation(name: str, dataset: str = "imagenet", interpolation: str = "bilinear",
                             fill: Optional[int] = None) -> Optional[Callable]:
    """The ``transforms.v2`` policy ``name`` (None for ``none``), applied to uint8 images or PIL images.

    ``interpolation`` is the filter of the geometric operations (rotate, shear, translate: torchvision
    allows nearest and bilinear only, so ``bicubic`` uses bilinear there); ``fill`` the value of the
    pixels they uncover (torchvision's default: 0). DALI fills with 128.
    """
    if name == "none":
        return None
    from torchvision.transforms import InterpolationMode, v2

    geometric = InterpolationMode.NEAREST if interpolation == "nearest" else InterpolationMode.BILINEAR
    if name == "autoaugment":
        policy = v2.AutoAugmentPolicy.CIFAR10 if dataset == "cifar10" else v2.AutoAugmentPolicy.IMAGENET
        return v2.AutoAugment(policy, interpolation=geometric, fill=fill)
    if name == "randaugment":
        return v2.RandAugment(RANDAUGMENT_OPS, RANDAUGMENT_MAGNITUDE, interpolation=geometric, fill=fill)
    if name == "trivialaugment":
        return v2.TrivialAugmentWide(interpolation=geometric, fill=fill)
    raise ValueError(f"unknown augmentation {name!r}; valid: {', '.join(AUGMENTATIONS)}")
