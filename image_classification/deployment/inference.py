"""What export and single-image inference share: a trained model rebuilt from its checkpoint, made
deploy-only, and the validation preprocessing of the dataset it was trained on.

* :func:`load_inference_model` reads a checkpoint (this project's, a raw state dict, an EMA state or the
  authors' PEDConv release), rebuilds ``arch``/``conv``/``placement``/``num_classes``/``in_chans`` from the
  fields the trainer records (or from arguments where the checkpoint lacks them), loads the weights with
  the usual key/shape checks and returns the model in eval mode without training-only parts.
* :func:`strip_training_parts` removes PEDConv's info-max decoders (the sampling noise and dropout are
  off in eval mode).
* :func:`preprocess_images` applies the validation transform of the checkpoint's dataset: ImageNet
  ``Resize(round(S * 256 / 224))`` + ``CenterCrop(S)``; Fashion-MNIST / CIFAR-10 a resize to ``S x S``
  (bilinear, antialiased, as their loaders do for non-native sizes), grey or RGB as trained; then the
  dataset's mean/std.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from image_classification.argparsing import positive_int

from ..data import DATASETS, DataConfig, DataError
from ..dynamic.registry import implied_spec
from ..training.checkpoint import CheckpointError, add_trust_flag, load_checkpoint, load_model_weights, recorded_args

__all__ = [
    "InferenceModel",
    "add_model_arguments",
    "dataset_class_names",
    "load_class_names",
    "load_inference_model",
    "preprocess_images",
    "strip_training_parts",
]


def add_model_arguments(parser: argparse.ArgumentParser, image_size: bool, dataset_help: str) -> None:
    """The model flags of the inference CLIs (classify, export): only needed when a checkpoint does not
    record its model; ``image_size`` adds ``--image-size`` to the group."""
    group = parser.add_argument_group("model (only needed when the checkpoint does not record it)")
    group.add_argument("--arch")
    group.add_argument("--conv", help="operator spec")
    group.add_argument("--placement")
    group.add_argument("--num-classes", type=positive_int)
    group.add_argument("--in-chans", type=positive_int)
    if image_size:
        group.add_argument("--image-size", type=positive_int)
    group.add_argument("--dataset", help=dataset_help)
    add_trust_flag(parser)


@dataclass
class InferenceModel:
    """A model ready for inference and what was needed to build and feed it."""

    model: nn.Module
    arch: str
    conv: str
    placement: str
    num_classes: int
    in_chans: int
    image_size: int
    dataset: str
    source: str  # the checkpoint path


def strip_training_parts(model: nn.Module) -> int:
    """Remove training-only submodules (PEDConv's info-max decoders); returns how many were removed."""
    removed = 0
    for module in model.modules():
        remover = getattr(module, "remove_infomax_decoder", None)
        if callable(remover) and getattr(module, "infomax_decoder", None) is not None:
            remover()
            removed += 1
    return removed


def _last_2d(state_dict: Mapping[str, Any]) -> Optional[torch.Tensor]:
    found = None
    for value in state_dict.values():
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            found = value
    return found


def _first_4d(state_dict: Mapping[str, Any]) -> Optional[torch.Tensor]:
    for value in state_dict.values():
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            return value
    return None


def load_inference_model(
    checkpoint: str,
    arch: Optional[str] = None,
    conv: Optional[str] = None,
    placement: Optional[str] = None,
    num_classes: Optional[int] = None,
    in_chans: Optional[int] = None,
    image_size: Optional[int] = None,
    dataset: Optional[str] = None,
    ema: bool = False,
    device: str | torch.device = "cpu",
) -> InferenceModel:
    """Rebuild the model of ``checkpoint`` for inference (eval mode, training-only parts removed).

    Arguments override or complete the checkpoint's ``arch``/``conv``/``placement``/``num_classes``/
    ``in_chans``/``image_size`` fields and its recorded dataset; a raw state dict needs at least ``arch``
    (the class count and input channels are then read from the classifier and stem weights). ``ema``
    loads the checkpoint's EMA weights. Raises :class:`CheckpointError` (one line, naming the file) for
    an unreadable or mismatching checkpoint and ``ValueError`` for a bad argument.
    """
    from ..models import ARCHS, build_model

    data = load_checkpoint(checkpoint)
    state_dict = data["state_dict"]
    args = recorded_args(data)
    arch = arch or data.get("arch")
    if not arch:
        raise CheckpointError(f"checkpoint {checkpoint} records no architecture; give it (--arch)")
    if conv is None:
        conv = data.get("conv") or implied_spec(state_dict) or "static"
    placement = placement or data.get("placement") or "paper"
    dataset = dataset or args.get("dataset") or "imagenet"
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    if num_classes is None:
        num_classes = data.get("num_classes") or args.get("num_classes")
        if not num_classes:
            last = _last_2d(state_dict)
            num_classes = int(last.shape[0]) if last is not None else DATASETS[dataset].num_classes
    if in_chans is None:
        in_chans = data.get("in_chans")
        if not in_chans:
            first = _first_4d(state_dict)
            in_chans = int(first.shape[1]) if first is not None else DATASETS[dataset].in_chans
    if image_size is None:
        image_size = data.get("image_size") or args.get("image_size")
        if not image_size:
            image_size = (DATASETS[dataset].image_size if dataset != "imagenet"
                          else getattr(ARCHS.get(arch), "image_size", 224))
    model = build_model(arch, conv, placement, num_classes=int(num_classes), in_chans=int(in_chans))
    source: Mapping[str, Any] = data
    if ema:
        if not isinstance(data.get("ema"), Mapping):
            raise CheckpointError(f"checkpoint {checkpoint} holds no EMA weights (trained without --use-ema)")
        source = {"state_dict": data["ema"], "arch": data.get("arch"), "conv": data.get("conv")}
    try:
        load_model_weights(model, source, expected_arch=arch, expected_conv=conv)
    except CheckpointError as exc:
        message = str(exc)
        if message.startswith("checkpoint"):
            message = message[len("checkpoint"):].lstrip(" :")
        raise CheckpointError(f"checkpoint {checkpoint}: {message}") from None
    model.eval()
    strip_training_parts(model)
    model.to(device)
    return InferenceModel(model, str(arch), str(conv), str(placement), int(num_classes), int(in_chans),
                          int(image_size), str(dataset), str(checkpoint))


# ------------------------------------------------------------------------------------------ classes
def dataset_class_names(dataset: str) -> Optional[List[str]]:
    """The class names a dataset ships with (Fashion-MNIST, CIFAR-10), or None (ImageNet folders)."""
    from ..data.small import CIFAR10_CLASSES, FASHION_MNIST_CLASSES

    return {"fashion-mnist": list(FASHION_MNIST_CLASSES), "cifar10": list(CIFAR10_CLASSES)}.get(dataset)


def load_class_names(path: str, num_classes: int) -> List[str]:
    """Class names from a text file, one per line in class-index order (blank lines and ``#`` comments
    skipped; an ImageNet ``LOC_synset_mapping.txt`` line ``n01440764 tench, Tinca tinca`` works as is)."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [line.strip() for line in handle]
    except OSError as exc:
        raise ValueError(f"cannot read class-names file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"class-names file {path} is not UTF-8 text") from None
    names = [line for line in lines if line and not line.startswith("#")]
    if len(names) != num_classes:
        raise ValueError(f"class-names file {path} has {len(names)} names, the model has {num_classes} classes")
    return names


# ------------------------------------------------------------------------------------ preprocessing
def _open_image(path: str, mode: str):
    from PIL import Image, UnidentifiedImageError

    from ..data.imagefolder import scale_to_8bit

    if not os.path.isfile(path):
        raise DataError(f"image {path} not found" if not os.path.exists(path) else f"image path {path} is not a file")
    try:
        with open(path, "rb") as handle:
            opened = Image.open(handle)
            opened.load()
            image, note = scale_to_8bit(opened, path)
        if note is not None:
            print(f"note: {note}", file=sys.stderr, flush=True)
        return image.convert(mode)
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: not a recognised image format") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for corrupt files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot read image {path}: {reason}") from None


def preprocess_images(paths: Sequence[str], dataset: str, image_size: int, in_chans: int) -> torch.Tensor:
    """The validation preprocessing of ``dataset`` applied to image files: an N x C x S x S float batch.

    Raises :class:`DataError` naming the first file that is missing or not a readable image.
    """
    from torchvision.transforms import v2 as T

    from ..data.imagefolder import imagenet_normalizer, imagenet_transforms

    info = DATASETS[dataset]
    grey = info.in_chans == 1
    tensors = []
    if dataset == "imagenet":
        cfg = DataConfig(dataset="imagenet", image_size=image_size, augment=False)
        _, val_transform = imagenet_transforms(cfg)
        for path in paths:
            tensors.append(val_transform(T.functional.pil_to_tensor(_open_image(path, "RGB"))))
        batch = imagenet_normalizer(cfg)(torch.stack(tensors))
        if in_chans != batch.shape[1]:
            raise ValueError(f"the model expects {in_chans} input channels; ImageNet preprocessing gives 3")
        return batch
    to_tensor = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True)])
    for path in paths:
        x = to_tensor(_open_image(path, "L" if grey else "RGB")).unsqueeze(0)
        if x.shape[-2:] != (image_size, image_size):
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        tensors.append(x[0])
    batch = torch.stack(tensors)
    repeat = in_chans // batch.shape[1]
    if repeat * batch.shape[1] != in_chans:
        raise ValueError(f"the model expects {in_chans} input channels; {dataset} images have {batch.shape[1]}")
    if repeat > 1:
        batch = batch.repeat(1, repeat, 1, 1)
    mean = torch.tensor(list(info.mean) * repeat).view(1, -1, 1, 1)
    std = torch.tensor(list(info.std) * repeat).view(1, -1, 1, 1)
    return (batch - mean) / std

