"""Single-image inference: top-k classes with probabilities for one or more image files.

Usage (DeepLearningExamples' ``classify.py``; the root ``classify.py`` runs this)::

    python -m image_classification.tools.classify CHECKPOINT IMAGE [IMAGE ...] [--topk 5] [--class-names FILE]
        [--device cpu|cuda|auto] [--batch-size 32] [--ema] [--json] [--arch A --conv SPEC ...]

The model is rebuilt from the checkpoint (arch, operator, placement, classes and input size recorded by
the trainer; ``--arch`` etc. complete a bare state dict) and the images go through the validation
preprocessing of the dataset it was trained on (ImageNet: resize to ``round(S * 256 / 224)`` + center
crop ``S``; Fashion-MNIST / CIFAR-10: grey / RGB resized to ``S x S``; the dataset's mean/std), in
batches of ``--batch-size``. Class names come from ``--class-names`` (one per line, in class-index
order), else from the dataset (Fashion-MNIST, CIFAR-10), else class indices are printed. A missing or
unreadable image or checkpoint is a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from image_classification.argparsing import ArgumentParser, positive_int, run_program
from image_classification.data import DataError
from image_classification.deployment.inference import (
    add_model_arguments,
    dataset_class_names,
    load_class_names,
    load_inference_model,
    preprocess_images,
)
from image_classification.training.checkpoint import CheckpointError, trust_checkpoints

__all__ = ["Prediction", "classify_images", "main"]


@dataclass(frozen=True)
class Prediction:
    """Top-k result for one image: class indices, names and softmax probabilities (descending)."""

    image: str
    indices: List[int]
    names: List[str]
    probabilities: List[float]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"bad --device {name!r}; use cpu, cuda, cuda:N or auto") from None


@torch.no_grad()
def classify_images(model: torch.nn.Module, images: Sequence[str], dataset: str, image_size: int, in_chans: int,
                    class_names: Optional[Sequence[str]] = None, topk: int = 5, batch_size: int = 32,
                    device: torch.device | str = "cpu") -> List[Prediction]:
    """Top-``topk`` predictions for each image file, preprocessed as in validation, in batches."""
    device = torch.device(device)
    model.eval()
    results: List[Prediction] = []
    from tqdm import tqdm

    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="classify", unit="batch", disable=len(starts) <= 1, file=sys.stderr):
        paths = list(images[start : start + batch_size])
        batch = preprocess_images(paths, dataset, image_size, in_chans).to(device)
        probs = torch.softmax(model(batch).float(), dim=1).cpu()
        k = min(topk, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        for path, vals, idx in zip(paths, values.tolist(), indices.tolist()):
            names = [class_names[i] if class_names is not None else str(i) for i in idx]
            results.append(Prediction(path, idx, names, vals))
    return results


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="classify.py", description="Classify images with a trained checkpoint.")
    p.add_argument("checkpoint", help="checkpoint file (model_best.pth.tar, checkpoint.pth.tar, a state dict)")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    p.add_argument("--topk", type=positive_int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--class-names", help="text file with one class name per line, in class-index order")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--batch-size", "-b", type=positive_int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    add_model_arguments(p, image_size=True,
                        dataset_help="imagenet, fashion-mnist or cifar10 (its preprocessing and class names)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    trust_checkpoints(args.trust_checkpoints)
    try:
        device = _device(args.device)
        loaded = load_inference_model(
            args.checkpoint, arch=args.arch, conv=args.conv, placement=args.placement, num_classes=args.num_classes,
            in_chans=args.in_chans, image_size=args.image_size, dataset=args.dataset, ema=args.ema, device=device)
        names = (load_class_names(args.class_names, loaded.num_classes) if args.class_names
                 else dataset_class_names(loaded.dataset))
        if names is not None and len(names) < loaded.num_classes:
            names = names + [str(i) for i in range(len(names), loaded.num_classes)]
        results = classify_images(loaded.model, args.images, loaded.dataset, loaded.image_size, loaded.in_chans,
                                  names, args.topk, args.batch_size, device)
    except (CheckpointError, DataError, ValueError, OSError) as exc:
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(exc).split())}\n")
    for result in results:
        if args.json:
            print(json.dumps({"image": result.image, "top": [
                {"class": i, "name": n, "probability": round(p, 6)}
                for i, n, p in zip(result.indices, result.names, result.probabilities)]}))
            continue
        print(result.image)
        for rank, (i, n, p) in enumerate(zip(result.indices, result.names, result.probabilities), 1):
            print(f"  {rank}. {n:<24} {100 * p:6.2f} %" + (f"  (class {i})" if n != str(i) else ""))
    return 0


if __name__ == "__main__":
    run_program(main)
