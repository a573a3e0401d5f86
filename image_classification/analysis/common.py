"""What the analysis CLIs share: checkpoint -> model, validation images, outputs, one-line errors.

Models are built the way ``main.py`` builds them (:func:`image_classification.models.build_model` from the
checkpoint's ``arch``/``conv``/``placement``/``num_classes``/``in_chans`` fields, then
:func:`image_classification.training.checkpoint.load_model_weights`, which also reads EMA states and the
authors' released PEDConv layout); images come from the project's loaders
(:func:`image_classification.data.build_loaders`, validation split, deterministic transform).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from image_classification.atomic_files import replaced_atomically
from image_classification.data import DATASETS, DataConfig, DataError, build_loaders
from image_classification.dynamic.registry import implied_spec
from image_classification.training.checkpoint import (
    CheckpointError,
    add_trust_flag,
    load_checkpoint,
    load_model_weights,
    trust_checkpoints,
)

__all__ = ["LoadedModel", "add_data_flags", "load_classifier", "validation_batches", "write_csv", "save_figure",
           "run_analysis", "AnalysisError"]


class AnalysisError(ValueError):
    """Bad input for an analysis tool (one-line message, exit status 2)."""


@dataclass
class LoadedModel:
    model: nn.Module
    path: str
    arch: str
    conv: str
    placement: str
    num_classes: int
    in_chans: int
    image_size: Optional[int]


def load_classifier(path: str, arch: Optional[str] = None, device: str = "cpu") -> LoadedModel:
    """Build the classifier stored in ``path`` and load its weights (eval mode).

    ``arch`` is needed only for checkpoints without an ``arch`` field (raw state dicts, the authors' release).
    """
    from image_classification.models import build_model

    checkpoint = load_checkpoint(path)
    nested = checkpoint.get("state_dict")
    state = nested if isinstance(nested, dict) else checkpoint
    found_arch = checkpoint.get("arch")
    if arch is not None and found_arch is not None and str(found_arch) != arch:
        raise AnalysisError(f"checkpoint {path} is for arch {found_arch}, --arch says {arch}")
    arch = arch or found_arch
    if arch is None:
        raise AnalysisError(f"checkpoint {path} records no arch; give --arch")
    conv = checkpoint.get("conv")
    if conv is None:
        conv = implied_spec(state) or "static"
    placement = str(checkpoint.get("placement") or "paper")
    num_classes = checkpoint.get("num_classes")
    if num_classes is None:
        fc = [v for k, v in state.items() if str(k).endswith("fc.weight") and isinstance(v, torch.Tensor)]
        num_classes = int(fc[-1].shape[0]) if fc else 1000
    in_chans = int(checkpoint.get("in_chans") or 3)
    try:
        model = build_model(str(arch), conv=str(conv), placement=placement, num_classes=int(num_classes),
                            in_chans=in_chans)
    except ValueError as exc:
        raise AnalysisError(f"checkpoint {path}: {exc}") from None
    load_model_weights(model, checkpoint, expected_arch=str(arch), expected_conv=str(conv))
    model.to(device).eval()
    image_size = checkpoint.get("image_size")
    return LoadedModel(model, path, str(arch), str(conv), placement, int(num_classes), in_chans,
                       int(image_size) if image_size else None)


def add_data_flags(parser: argparse.ArgumentParser, images_default: int) -> None:
    """DATA and the loader flags of ``main.py`` that an analysis needs."""
    parser.add_argument("data", metavar="DATA", nargs="?", default=None,
                        help="dataset directory as for main.py (ImageNet layout DATA/val/<class>/*; the IDX "
                        "directory for fashion-mnist; unused with --data-backend synthetic)")
    parser.add_argument("--dataset", default="imagenet", choices=sorted(DATASETS))
    parser.add_argument("--data-backend", default="pytorch", choices=("pytorch", "synthetic"))
    parser.add_argument("--image-size", type=int, default=None,
                        help="input size (default: the checkpoint's, else the dataset's)")
    parser.add_argument("--images", type=int, default=images_default,
                        help=f"validation images used (a seeded random subset; default {images_default})")
    parser.add_argument("-b", "--batch-size", type=int, default=32)
    parser.add_argument("-j", "--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="picks the image subset")
    parser.add_argument("--arch", default=None, help="architecture, for checkpoints that do not record it")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    add_trust_flag(parser)
    parser.add_argument("--out", required=True, help="output directory (PNG + CSV written there)")


def check_data_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The shared flags' checks; ``--trust-checkpoints`` applies to every checkpoint the tool loads."""
    trust_checkpoints(args.trust_checkpoints)
    for name in ("images", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.image_size is not None and args.image_size < 8:
        parser.error(f"--image-size must be >= 8, got {args.image_size}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if args.data_backend != "synthetic" and args.data is None and DATASETS[args.dataset].default_root is None:
        parser.error("DATA is required (or --data-backend synthetic)")


def validation_batches(
    args: argparse.Namespace, loaded: LoadedModel
) -> Tuple[Iterator[Tuple[torch.Tensor, torch.Tensor]], Any]:
    """Batches of the first ``args.images`` images of a seeded validation subset, and the Loaders."""
    cfg = DataConfig(
        backend=args.data_backend, dataset=args.dataset, root=args.data or DATASETS[args.dataset].default_root,
        batch_size=args.batch_size, val_batch_size=args.batch_size, workers=args.workers,
        image_size=args.image_size or loaded.image_size, num_classes=loaded.num_classes, in_chans=loaded.in_chans,
        seed=args.seed, val_subset=args.images, train_subset=1, augment=False,
        synthetic_val_batches=-(-args.images // args.batch_size), synthetic_train_batches=1,
    )
    loaders = build_loaders(cfg)

    def batches() -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        from tqdm import tqdm

        left = args.images
        with tqdm(total=args.images, desc="images", unit="img", file=sys.stderr, disable=None) as bar:
            for images, targets in loaders.val:
                if left <= 0:
                    return
                yield images[:left], targets[:left]
                bar.update(min(left, images.shape[0]))
                left -= images.shape[0]

    return batches(), loaders


def write_csv(path: str, rows: Sequence[Dict[str, Any]]) -> str:
    """Write ``rows`` (dicts with the same keys) as CSV, atomically."""
    if not rows:
        raise AnalysisError(f"nothing to write to {path}")
    with replaced_atomically(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def save_figure(fig: Any, path: str) -> str:
    """Save a matplotlib figure as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def prepare_out(path: str) -> str:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise AnalysisError(f"cannot create output directory {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK):
        raise AnalysisError(f"output directory {path} is not writable")
    return path


def denormalize(images: torch.Tensor, dataset: str) -> torch.Tensor:
    """Undo the loaders' mean/std normalisation (for display), clamped to [0, 1]."""
    info = DATASETS[dataset]
    channels = images.shape[1]
    mean = torch.tensor(list(info.mean) * (channels // len(info.mean)), dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(list(info.std) * (channels // len(info.std)), dtype=images.dtype).view(1, -1, 1, 1)
    return (images.cpu() * std + mean).clamp(0, 1)


def dynamic_layers(model: nn.Module, method: str) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every submodule that has ``method`` (a dynamic operator's inspection hook)."""
    return [(name, m) for name, m in model.named_modules() if name and callable(getattr(m, method, None))]


def run_analysis(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; bad input (data, checkpoint, options) becomes ``prog: error: <one line>``, exit 2."""
    import matplotlib

    matplotlib.use("Agg")
    try:
        return body()
    except (AnalysisError, DataError, CheckpointError) as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 2
