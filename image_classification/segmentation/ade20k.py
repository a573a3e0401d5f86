"""ADE20K folder layout (the SceneParsing challenge release ``ADEChallengeData2016``): reader, augmentation,
mean IoU, and a tiny synthetic writer.

Layout::

    DATA/images/training/<name>.jpg          DATA/annotations/training/<name>.png
    DATA/images/validation/<name>.jpg        DATA/annotations/validation/<name>.png

Annotations are 8-bit single-channel PNGs: 0 = "other" (ignored), 1..150 = the 150 classes; they become
labels 0..149 and ``IGNORE_INDEX`` (255). Every image needs the annotation of the same stem.

Training augmentation follows the ADE20K reference training: random rescale (shorter side drawn from
``scales``, longer side capped at ``max_size``), horizontal flip, then a random ``crop`` x ``crop`` window
padded with the ignore label where the image is smaller (so images batch). Validation rescales the shorter
side to ``val_size`` and scores the prediction upsampled to the annotation's full resolution.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2 as T
from tqdm import tqdm

from image_classification.data import IMAGENET_MEAN, IMAGENET_STD, DataError
from image_classification.data.imagefolder import load_image

__all__ = ["ADE20K", "ADE20K_CLASSES", "IGNORE_INDEX", "ConfusionMatrix", "segmentation_transforms",
           "write_synthetic_ade20k"]

ADE20K_CLASSES = 150
IGNORE_INDEX = 255
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def _load_mask(path: str) -> torch.Tensor:
    try:
        with Image.open(path) as handle:
            handle.load()
            if handle.mode not in ("L", "P", "I;16", "I"):
                raise DataError(f"annotation {path} has mode {handle.mode}; expected an 8-bit label PNG")
            mask = torch.from_numpy(__import__("numpy").array(handle, dtype="int64"))
    except DataError:
        raise
    except Exception as exc:  # PIL: OSError, SyntaxError, ...
        raise DataError(f"cannot read annotation {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    return mask


class ADE20K(Dataset):
    """One split (``training``/``validation``): ``(image float C x H x W normalised, mask int64 H x W)``."""

    def __init__(self, root: Optional[str], split: str, transform: Optional[T.Transform] = None,
                 num_classes: int = ADE20K_CLASSES) -> None:
        if not root:
            raise DataError("no DATA directory given (expected DATA/images/<split>/ and DATA/annotations/<split>/)")
        if not os.path.isdir(root):
            raise DataError(f"DATA directory {root} does not exist")
        images = os.path.join(root, "images", split)
        annotations = os.path.join(root, "annotations", split)
        for folder in (images, annotations):
            if not os.path.isdir(folder):
                raise DataError(f"{root}: missing {folder} (ADE20K layout: DATA/images/{split}/, "
                                f"DATA/annotations/{split}/)")
        names = sorted(n for n in os.listdir(images) if n.lower().endswith(_IMAGE_EXTENSIONS))
        if not names:
            raise DataError(f"{images} holds no images ({', '.join(_IMAGE_EXTENSIONS)})")
        self.samples: List[Tuple[str, str]] = []
        missing = []
        for name in names:
            mask = os.path.join(annotations, os.path.splitext(name)[0] + ".png")
            if os.path.isfile(mask):
                self.samples.append((os.path.join(images, name), mask))
            else:
                missing.append(name)
        if missing:
            raise DataError(f"{annotations}: no annotation PNG for {len(missing)} image(s), e.g. {missing[0]}")
        self.split, self.transform, self.num_classes = split, transform, num_classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.samples[index]
        image = load_image(image_path)
        mask = _load_mask(mask_path)
        if tuple(mask.shape) != (image.height, image.width):
            raise DataError(f"annotation {mask_path} is {mask.shape[1]}x{mask.shape[0]}, image is "
                            f"{image.width}x{image.height}")
        if int(mask.max()) > self.num_classes:
            raise DataError(f"annotation {mask_path} has label {int(mask.max())} > {self.num_classes} classes")
        labels = torch.where(mask == 0, torch.full_like(mask, IGNORE_INDEX), mask - 1)
        img = tv_tensors.Image(T.functional.pil_to_tensor(image))
        target = tv_tensors.Mask(labels)
        if self.transform is not None:
            img, target = self.transform(img, target)
        img = T.functional.normalize(T.functional.to_dtype(img, torch.float32, scale=True),
                                     list(IMAGENET_MEAN), list(IMAGENET_STD))
        return img.as_subclass(torch.Tensor), target.as_subclass(torch.Tensor).long()


class _RandomShorterSide(torch.nn.Module):
    """Rescale so the shorter side is one of ``sizes`` (drawn), the longer at most ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: int) -> None:
        super().__init__()
        self.sizes, self.max_size = list(sizes), int(max_size)

    def forward(self, image: Any, mask: Any) -> Tuple[Any, Any]:
        height, width = image.shape[-2:]
        short = random.choice(self.sizes)
        scale = min(short / min(height, width), self.max_size / max(height, width))
        size = [max(1, round(height * scale)), max(1, round(width * scale))]
        return T.functional.resize(image, size, antialias=True), T.functional.resize(
            mask, size, interpolation=T.InterpolationMode.NEAREST)


def segmentation_transforms(crop: int, scales: Sequence[int], max_size: int, val_size: int,
                            augment: bool = True) -> Tuple[T.Transform, T.Transform]:
    """(train, val) transforms on ``(tv_tensors.Image, tv_tensors.Mask)`` pairs (module docstring)."""
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
    steps: List[Any] = [_RandomShorterSide(scales, max_size), T.RandomHorizontalFlip()] if augment else [
        _RandomShorterSide([val_size], max_size)]
    train = T.Compose([*steps, T.RandomCrop(crop, pad_if_needed=True, fill=fill)])
    val = T.Compose([_RandomShorterSide([val_size], max_size)])
    return train, val


class ConfusionMatrix:
    """Accumulates a ``classes x classes`` confusion matrix (rows: truth) ignoring ``IGNORE_INDEX``."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        keep = target != IGNORE_INDEX
        index = target[keep].long() * self.num_classes + prediction[keep].long()
        self.matrix += torch.bincount(index.cpu(), minlength=self.num_classes ** 2).view(self.num_classes, -1)

    def metrics(self) -> Dict[str, float]:
        """mean IoU over classes present in truth or prediction, pixel accuracy (both in %)."""
        m = self.matrix.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        present = union > 0
        iou = tp[present] / union[present]
        total = m.sum()
        return {"val.mIoU": 100.0 * float(iou.mean()) if present.any() else 0.0,
                "val.pixel_acc": 100.0 * float(tp.sum() / total) if total > 0 else 0.0}


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, loader: Any, device: torch.device, num_classes: int,
                          full_masks: Optional[Dataset] = None) -> Dict[str, float]:
    """mIoU / pixel accuracy of ``model`` over ``loader`` (batches of one rescaled image and its mask).

    With ``full_masks`` (the same split without transform) the logits are upsampled to the annotation's
    original resolution and scored there, as the ADE20K benchmark does.
    """
    was = model.training
    model.eval()
    confusion = ConfusionMatrix(num_classes)
    try:
        for index, (images, masks) in enumerate(tqdm(loader, desc="mIoU eval", file=sys.stderr, disable=None,
                                                     leave=False)):
            logits = model(images.to(device))["out"].float()
            if full_masks is not None and images.shape[0] == 1:
                masks = _load_mask(full_masks.samples[index][1])[None]  # type: ignore[attr-defined]  # the full-size set is an ADE20K set, typed as Dataset
                masks = torch.where(masks == 0, torch.full_like(masks, IGNORE_INDEX), masks - 1)
                logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
            confusion.update(logits.argmax(1).cpu(), masks.cpu())
    finally:
        model.train(was)
    return confusion.metrics()


# ------------------------------------------------------------------------------------ synthetic data
def write_synthetic_ade20k(root: str, train_images: int = 8, val_images: int = 4, size: int = 96,
                           classes: int = 4, seed: int = 0) -> str:
    """Write a tiny ADE20K-layout set under ``root``: noisy images with filled rectangles whose colour is
    their class (labels 1..``classes``; 0 = background "other", ignored). Returns ``root``."""
    import numpy as np

    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
    if not 1 <= classes <= len(palette):
        raise ValueError(f"classes must be in 1..{len(palette)}, got {classes}")
    rng = np.random.default_rng(seed)
    for split, count in (("training", train_images), ("validation", val_images)):
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        os.makedirs(os.path.join(root, "annotations", split), exist_ok=True)
        for index in range(count):
            image = rng.integers(90, 150, size=(size, size, 3), dtype=np.uint8)
            mask = np.zeros((size, size), dtype=np.uint8)
            for _ in range(int(rng.integers(2, 5))):
                w, h = (int(v) for v in rng.integers(size // 5, size // 2, size=2))
                x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
                label = int(rng.integers(1, classes + 1))
                image[y:y + h, x:x + w] = palette[label - 1]
                mask[y:y + h, x:x + w] = label
            stem = f"ADE_{split[:5]}_{index:08d}"
            Image.fromarray(image).save(os.path.join(root, "images", split, stem + ".jpg"), quality=95)
            Image.fromarray(mask).save(os.path.join(root, "annotations", split, stem + ".png"))
    return root
