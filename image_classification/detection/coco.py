"""COCO folder layout: reader, SSD augmentation, evaluation (pycocotools) and a tiny synthetic writer.

Layout (COCO 2017 as distributed; ``--train-split``/``--val-split`` select other names)::

    DATA/annotations/instances_train2017.json
    DATA/annotations/instances_val2017.json
    DATA/train2017/<file_name>        (file_name as in the JSON "images" entries)
    DATA/val2017/<file_name>

The JSON is read with the standard library: ``images`` (id, file_name, width, height), ``annotations``
(image_id, category_id, bbox [x, y, w, h] in pixels, iscrowd) and ``categories`` (id, name). Category ids
are mapped to contiguous labels 1..K in increasing id order (0 is SSD's background); crowd boxes and boxes
without area are left out of training, as in torchvision's detection references. Validation runs the
official COCO evaluator (pycocotools) on the original annotation file and reports the columns of PEDConv
Table 2: AP, AP50, AP75, APs, APm, APl (bbox, in %).

Training augmentation is SSD's (Liu et al. 2016, Sec. 2.2) from ``torchvision.transforms.v2``: photometric
distortion, zoom out (expansion), IoU-constrained random crop, horizontal flip, then resize to the input size.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2 as T
from tqdm import tqdm

from image_classification.data import DataError
from image_classification.data.imagefolder import load_image

__all__ = ["CocoDetection", "collate", "coco_evaluate", "resize_transform", "ssd_train_transform",
           "write_synthetic_coco"]


@dataclass(frozen=True)
class CocoSplit:
    images_dir: str
    annotation_file: str


def find_split(root: Optional[str], split: str) -> CocoSplit:
    """Checked paths of ``split`` (e.g. ``train2017``) under the COCO layout."""
    if not root:
        raise DataError("no DATA directory given (expected DATA/annotations/instances_<split>.json and DATA/<split>/)")
    if not os.path.isdir(root):
        raise DataError(f"DATA directory {root} does not exist")
    annotation = os.path.join(root, "annotations", f"instances_{split}.json")
    images = os.path.join(root, split)
    if not os.path.isfile(annotation):
        raise DataError(f"{root}: missing {annotation} (COCO layout: DATA/annotations/instances_{split}.json)")
    if not os.path.isdir(images):
        raise DataError(f"{root}: missing image folder {images} (COCO layout: DATA/{split}/<images>)")
    return CocoSplit(images, annotation)


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(f"{path} has no '{key}' list (not a COCO instances file)")
    return data


class CocoDetection(Dataset):
    """One COCO split (``skip_empty``: only images with a box): ``(image, target)`` with ``image`` a float
    tensor in [0, 1] (C x H x W) and ``target`` ``boxes`` (N x 4, x1 y1 x2 y2 pixels), ``labels`` (N, 1..K),
    ``image_id``."""

    def __init__(self, root: Optional[str], split: str, transform: Optional[T.Transform] = None,
                 categories: Optional[Sequence[int]] = None, skip_empty: bool = False) -> None:
        where = find_split(root, split)
        self.split, self.images_dir, self.annotation_file = split, where.images_dir, where.annotation_file
        data = _read_json(where.annotation_file)
        ids = sorted(int(c["id"]) for c in data["categories"])
        if categories is not None and list(categories) != ids:
            raise DataError(f"{where.annotation_file}: categories {ids[:5]}... differ from the training split's")
        if not ids:
            raise DataError(f"{where.annotation_file} lists no categories")
        self.category_ids = ids
        self.label_of = {cid: i + 1 for i, cid in enumerate(ids)}
        self.category_names = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
        boxes: Dict[int, List[Tuple[List[float], int]]] = {}
        for ann in data["annotations"]:
            try:
                x, y, w, h = (float(v) for v in ann["bbox"])
                image_id, category = int(ann["image_id"]), int(ann["category_id"])
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{where.annotation_file}: malformed annotation {str(ann)[:120]}") from None
            if category not in self.label_of:
                raise DataError(f"{where.annotation_file}: annotation with unknown category_id {category}")
            if ann.get("iscrowd", 0) or w <= 1 or h <= 1:
                continue
            boxes.setdefault(image_id, []).append(([x, y, x + w, y + h], self.label_of[category]))
        self.images = []
        for image in data["images"]:
            try:
                self.images.append((int(image["id"]), str(image["file_name"])))
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{where.annotation_file}: malformed image entry {str(image)[:120]}") from None
        if skip_empty:  # training: images without a usable box teach nothing to SSD's matcher
            self.images = [entry for entry in self.images if entry[0] in boxes]
        if not self.images:
            raise DataError(f"{where.annotation_file} lists no images" + (" with boxes" if skip_empty else ""))
        self.boxes = boxes
        self.transform = transform

    @property
    def num_classes(self) -> int:
        """Categories + background."""
        return len(self.category_ids) + 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        image_id, file_name = self.images[index]
        image = load_image(os.path.join(self.images_dir, file_name))
        entries = self.boxes.get(image_id, [])
        width, height = image.size
        boxes = torch.tensor([b for b, _ in entries], dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor([label for _, label in entries], dtype=torch.int64),
            "image_id": image_id,
        }
        img = tv_tensors.Image(T.functional.pil_to_tensor(image))
        if self.transform is not None:
            img, target = self.transform(img, target)
        img = T.functional.to_dtype(img, torch.float32, scale=True)
        return img.as_subclass(torch.Tensor), {"boxes": target["boxes"].as_subclass(torch.Tensor),
                                               "labels": target["labels"], "image_id": image_id}


def ssd_train_transform(size: int) -> T.Transform:
    """SSD's augmentation (photometric distortion, zoom out, IoU crop, flip) and resize to ``size``."""
    return T.Compose([
        T.RandomPhotometricDistort(p=0.5),
        T.RandomZoomOut(fill=[124, 116, 104], side_range=(1.0, 4.0), p=0.5),
        T.RandomIoUCrop(),
        T.RandomHorizontalFlip(p=0.5),
        T.Resize((size, size), antialias=True),
        T.SanitizeBoundingBoxes(),
    ])


def resize_transform(size: int) -> T.Transform:
    """Resize to ``size`` x ``size`` only (no augmentation)."""
    return T.Compose([T.Resize((size, size), antialias=True), T.SanitizeBoundingBoxes()])


def collate(batch: Sequence[Tuple[torch.Tensor, Dict[str, Any]]]) -> Tuple[List[torch.Tensor], List[Dict[str, Any]]]:
    """Lists of images and targets (SSD takes lists)."""
    return [b[0] for b in batch], [b[1] for b in batch]


@torch.no_grad()
def coco_evaluate(
    model: torch.nn.Module, loader: Any, device: torch.device, dataset: CocoDetection
) -> Dict[str, float]:
    """COCO bbox AP of ``model`` (torchvision detection API, eval mode) over ``loader`` (pycocotools)."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise DataError("COCO evaluation needs pycocotools (pip install pycocotools, see requirements.txt)") from None
    was = model.training
    model.eval()
    results = []
    try:
        for images, targets in tqdm(loader, desc="COCO eval", file=sys.stderr, disable=None, leave=False):
            outputs = model([img.to(device) for img in images])
            for target, out in zip(targets, outputs):
                boxes = out["boxes"].float().cpu()
                for box, score, label in zip(boxes.tolist(), out["scores"].tolist(), out["labels"].tolist()):
                    x1, y1, x2, y2 = box
                    results.append({"image_id": int(target["image_id"]),
                                    "category_id": dataset.category_ids[int(label) - 1],
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    finally:
        model.train(was)
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    if not results:
        return {f"val.{n}": 0.0 for n in names}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO(dataset.annotation_file)
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.params.imgIds = sorted({int(img_id) for img_id, _ in dataset.images})
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {f"val.{n}": max(0.0, 100.0 * float(v)) for n, v in zip(names, evaluator.stats[:6])}


# ------------------------------------------------------------------------------------ synthetic data
_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def write_synthetic_coco(root: str, train_images: int = 8, val_images: int = 4, size: int = 320,
                         categories: int = 3, seed: int = 0) -> str:
    """Write a tiny COCO-layout detection set (``train2017``/``val2017`` + instance JSONs) under ``root``.

    Each image is a noisy grey background with 1-3 filled rectangles; the category is the rectangle's colour
    (ids 1..K, names ``shape<k>``), so a detector can learn it. Returns ``root``.
    """
    if not 1 <= categories <= len(_COLOURS):
        raise ValueError(f"categories must be in 1..{len(_COLOURS)}, got {categories}")
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    ann_id = 1
    for split, count in (("train2017", train_images), ("val2017", val_images)):
        folder = os.path.join(root, split)
        os.makedirs(folder, exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            image_id = 1 + index + (0 if split == "train2017" else 100000)
            pixels = Image.effect_noise((size, size), 24).convert("RGB")
            for _ in range(rng.randint(1, 3)):
                w, h = rng.randint(size // 5, size // 2), rng.randint(size // 5, size // 2)
                x, y = rng.randint(0, size - w - 1), rng.randint(0, size - h - 1)
                category = rng.randint(1, categories)
                pixels.paste(_COLOURS[category - 1], (x, y, x + w, y + h))
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": category,
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
                ann_id += 1
            name = f"{image_id:012d}.jpg"
            pixels.save(os.path.join(folder, name), quality=95)
            images.append({"id": image_id, "file_name": name, "width": size, "height": size})
        cats = [{"id": k, "name": f"shape{k}", "supercategory": "shape"} for k in range(1, categories + 1)]
        with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as handle:
            json.dump({"images": images, "annotations": annotations, "categories": cats}, handle)
    return root
