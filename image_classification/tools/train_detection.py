"""Train or evaluate SSD300 with a static or dynamic ResNet backbone on a COCO-layout dataset.

Usage::

    python -m image_classification.tools.train_detection DATA \
        --config configs/pedconv_table2/ssd300_resnet50_pedconv.yaml
    torchrun --nproc_per_node 8 -m image_classification.tools.train_detection DATA --config ... -b 8
    python -m image_classification.tools.train_detection DATA --evaluate \
        --weights logs/ssd/model_best.pth.tar --conv pedconv

DATA has the COCO layout (``annotations/instances_train2017.json``, ``train2017/``, ``val2017/``; see
:mod:`image_classification.detection.coco`). The paper's schedule (PEDConv Sec. 4.2, SSD's COCO recipe): SGD
momentum 0.9, batch 64, weight decay 5e-4, lr 1e-3 for 160k iterations, then 1e-4 and 1e-5 for 40k each.
Validation reports COCO bbox AP, AP50, AP75, APs, APm, APl (Table 2's columns) through pycocotools.
``python -m image_classification.tools.synthetic_detection OUT`` writes a tiny set in this layout.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from image_classification.argparsing import ArgumentParser, positive_int, run_program
from image_classification.dense.engine import (
    Task,
    TaskLoader,
    add_common_flags,
    parse_task_args,
    run_cli,
    train,
)
from image_classification.detection.coco import (
    CocoDetection,
    coco_evaluate,
    collate,
    resize_transform,
    ssd_train_transform,
)
from image_classification.detection.ssd import build_ssd300
from image_classification.training.distributed import init_distributed

PROG = "python -m image_classification.tools.train_detection"

DEFAULTS = dict(batch_size=64, iterations=240_000, lr=1e-3, lr_schedule="step", lr_steps=[160_000, 200_000],
                weight_decay=5e-4, workspace="logs/ssd300", eval_every=20_000, save_every=2_000)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog="COCO layout: DATA/annotations/instances_<split>.json, DATA/<split>/*.jpg")
    add_common_flags(parser, DEFAULTS)
    parser.add_argument("--image-size", type=int, default=300, help="SSD input side (default 300; >= 257)")
    parser.add_argument("--train-split", default="train2017")
    parser.add_argument("--val-split", default="val2017")
    parser.add_argument("--val-batch-size", type=positive_int, default=8)
    parser.add_argument("--no-augment", action="store_true",
                        help="train without SSD's augmentation (resize only; for debugging and smoke tests)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_task_args(parser, argv, "a COCO-layout directory")
    if args.image_size < 257:
        parser.error(f"--image-size must be >= 257 (SSD300's last extra blocks need it), got {args.image_size}")
    return args


def detection_losses(model: nn.Module, batch: Any, device: torch.device) -> Dict[str, torch.Tensor]:
    images, targets = batch
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
    return dict(model(images, targets))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        env = init_distributed(args.device)
        torch.manual_seed(args.seed + env.rank)
        train_set = None
        if not args.evaluate:
            transform = resize_transform(args.image_size) if args.no_augment else ssd_train_transform(args.image_size)
            train_set = CocoDetection(args.data, args.train_split, transform, skip_empty=True)
        val_set = None
        if args.evaluate or not args.no_eval:
            val_set = CocoDetection(args.data, args.val_split,
                                    categories=train_set.category_ids if train_set is not None else None)
        num_classes = (train_set or val_set).num_classes  # type: ignore[union-attr]  # one of the two sets exists (the parser requires a split)
        try:
            model = build_ssd300(args.conv, args.backbone, num_classes, args.trunk_placement or "paper",
                                 args.dynamic_parts_list, args.pretrained_backbone, size=args.image_size)
        except ValueError as exc:
            build_parser().error(str(exc))
        fields = {"arch": "ssd300", "conv": args.conv, "backbone": args.backbone, "num_classes": num_classes,
                  "trunk_placement": model.trunk_placement, "dynamic_parts": list(model.dynamic_parts)}
        train_loader = None if train_set is None else TaskLoader(train_set, args.batch_size, True, args.workers,
                                                                 env, args.seed, collate)
        val_loader = None if val_set is None else TaskLoader(val_set, args.val_batch_size, False, args.workers,
                                                             env, args.seed, collate)

        def evaluate(net: nn.Module, loader: Any, device: torch.device) -> Dict[str, float]:
            assert val_set is not None
            return coco_evaluate(net, loader, device, val_set)

        task = Task("detection", PROG, detection_losses, evaluate, "val.AP", fields)
        return train(args, task, model, train_loader, val_loader, env)

    return run_cli(PROG, body)


if __name__ == "__main__":
    run_program(main)
