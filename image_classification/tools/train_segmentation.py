"""Train or evaluate PSPNet / UperNet with a static or dynamic ResNet trunk on an ADE20K-layout dataset.

Usage::

    python -m image_classification.tools.train_segmentation DATA \
        --config configs/pedconv_table3/pspnet_resnet50_pedconv.yaml
    torchrun --nproc_per_node 8 -m image_classification.tools.train_segmentation DATA --config ... -b 2
    python -m image_classification.tools.train_segmentation DATA --arch upernet --conv pedconv --evaluate --weights W

DATA has the ADE20K layout (``images/{training,validation}/*.jpg``, ``annotations/{training,validation}/*.png``;
see :mod:`image_classification.segmentation.ade20k`). The paper (Sec. 4.3) follows the ADE20K reference
training: SGD momentum 0.9, weight decay 1e-4, lr 0.02 with poly decay (power 0.9), batch 16 (2 per GPU),
epochs of 5000 iterations, deep-supervision loss weight 0.4 (PSPNet), multi-scale training. Validation
reports mean IoU over the classes and pixel accuracy. Under torchrun BatchNorm is synchronised across
processes (2 images per GPU are too few for per-GPU statistics).
``python -m image_classification.tools.synthetic_segmentation OUT`` writes a tiny set in this layout.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Sequence, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from image_classification.argparsing import ArgumentParser, non_negative_float, positive_int, run_program
from image_classification.dense.engine import (
    Task,
    TaskLoader,
    add_common_flags,
    parse_task_args,
    run_cli,
    train,
)
from image_classification.segmentation.ade20k import (
    ADE20K,
    ADE20K_CLASSES,
    IGNORE_INDEX,
    evaluate_segmentation,
    segmentation_transforms,
)
from image_classification.segmentation.models import build_segmenter, list_segmenters
from image_classification.training.distributed import init_distributed

PROG = "python -m image_classification.tools.train_segmentation"

DEFAULTS = dict(batch_size=16, iterations=100_000, lr=0.02, lr_schedule="poly", weight_decay=1e-4,
                workspace="logs/segmentation", eval_every=10_000, save_every=1_000)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog="ADE20K layout: DATA/images/<split>/*.jpg, DATA/annotations/<split>/*.png")
    add_common_flags(parser, DEFAULTS)
    parser.add_argument("--arch", default="pspnet", help=f"segmenter: {', '.join(list_segmenters())}")
    parser.add_argument("--num-classes", type=positive_int, default=ADE20K_CLASSES, help="classes (ADE20K: 150)")
    parser.add_argument("--head-channels", type=positive_int, default=512,
                        help="width of the pyramid-pooling branches and heads (512 in the paper's models)")
    parser.add_argument("--crop-size", type=positive_int, default=512, help="training crop side")
    parser.add_argument("--scales", type=positive_int, nargs="+", default=[300, 375, 450, 525, 600],
                        help="training shorter sides (one drawn per image)")
    parser.add_argument("--max-size", type=positive_int, default=1000, help="longest side after rescaling")
    parser.add_argument("--val-size", type=positive_int, default=512, help="validation shorter side")
    parser.add_argument("--aux-weight", type=non_negative_float, default=0.4,
                        help="deep-supervision loss weight (PSPNet)")
    parser.add_argument("--train-split", default="training")
    parser.add_argument("--val-split", default="validation")
    parser.add_argument("--no-augment", action="store_true",
                        help="train without rescaling/flip (a fixed crop at --val-size; smoke tests)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_task_args(parser, argv, "an ADE20K-layout directory")
    if args.arch not in list_segmenters():
        parser.error(f"unknown --arch {args.arch!r}; valid: {', '.join(list_segmenters())}")
    if args.num_classes >= IGNORE_INDEX:
        parser.error(f"--num-classes must be < {IGNORE_INDEX} (the ignore label), got {args.num_classes}")
    return args


def pixel_cross_entropy(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels; 0 (not NaN) for a batch of crops without any label."""
    total = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (masks != IGNORE_INDEX).sum().clamp_min(1)


def segmentation_losses(aux_weight: float):
    def losses(model: nn.Module, batch: Any, device: torch.device) -> Dict[str, torch.Tensor]:
        images, masks = batch
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        out = model(images)
        terms = {"seg": pixel_cross_entropy(out["out"], masks)}
        if "aux" in out and aux_weight > 0:
            terms["aux"] = aux_weight * pixel_cross_entropy(out["aux"], masks)
        return terms
    return losses


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        env = init_distributed(args.device)
        torch.manual_seed(args.seed + env.rank)
        train_tf, val_tf = segmentation_transforms(args.crop_size, args.scales, args.max_size, args.val_size,
                                                   augment=not args.no_augment)
        train_set = None if args.evaluate else ADE20K(args.data, args.train_split, train_tf, args.num_classes)
        val_set = ADE20K(args.data, args.val_split, val_tf, args.num_classes) if (
            args.evaluate or not args.no_eval) else None
        try:
            model = build_segmenter(args.arch, args.conv, args.num_classes, args.backbone, args.trunk_placement,
                                    args.dynamic_parts_list, args.pretrained_backbone, args.head_channels)
        except ValueError as exc:
            build_parser().error(str(exc))
        if env.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        fields = {"arch": args.arch, "conv": args.conv, "backbone": args.backbone, "num_classes": args.num_classes,
                  "trunk_placement": model.trunk_placement, "dynamic_parts": list(cast(Any, model).dynamic_parts)}
        train_loader = None if train_set is None else TaskLoader(train_set, args.batch_size, True, args.workers,
                                                                 env, args.seed)
        val_loader = None if val_set is None else TaskLoader(val_set, 1, False, args.workers, env, args.seed)

        def evaluate(net: nn.Module, loader: Any, device: torch.device) -> Dict[str, float]:
            return evaluate_segmentation(net, loader, device, args.num_classes, full_masks=val_set)

        task = Task("segmentation", PROG, segmentation_losses(args.aux_weight), evaluate, "val.mIoU", fields)
        return train(args, task, model, train_loader, val_loader, env)

    return run_cli(PROG, body)


if __name__ == "__main__":
    run_program(main)
