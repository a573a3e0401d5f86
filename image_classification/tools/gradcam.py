"""Grad-CAM of several classifiers (e.g. static and PEDConv ResNet-50) on the same images, side by side.

PEDConv appendix A (Fig. 2) compares the Grad-CAM maps of ResNet-50 with static convolution and with PEDConv
on randomly sampled ImageNet validation images. Usage::

    python -m image_classification.tools.gradcam /data/imagenet \\
        --checkpoints logs/r50_static/model_best.pth.tar logs/r50_pedconv/model_best.pth.tar \\
        --labels static PEDConv --images 8 --out logs/gradcam

writes ``gradcam.png`` (rows: images; columns: the image, then each model's map over it, titled with its
prediction and probability) and ``gradcam.csv`` (per image and model: label, prediction, probability of the
explained class, where the map peaks and how concentrated it is).

Grad-CAM (Selvaraju et al., ICCV 2017, Eq. 1-2): for class c and the activations A^k of a target layer,
``alpha_k = mean_ij dy^c / dA^k_ij`` and ``L = ReLU(sum_k alpha_k A^k)``, upsampled bilinearly to the input and
scaled to [0, 1] per image. The target layer defaults to the last top-level child of the model that contains a
convolution (``layer4`` of the ResNets, ``features`` of MobileNet/EfficientNet). The explained class is the
predicted one (``--target predicted``, as in the appendix) or the true label (``--target label``).

The ``grad-cam`` package implements the same method; it is not used because it would bring OpenCV,
scikit-learn, SciPy and ttach into the project for these twenty lines (tested against a hook-free reference
in ``tests/analysis/test_gradcam.py``).
"""

from __future__ import annotations

import argparse
from typing import List, Optional, Sequence, Tuple

import torch

from image_classification.analysis.common import (
    AnalysisError,
    add_data_flags,
    check_data_flags,
    denormalize,
    load_classifier,
    prepare_out,
    run_analysis,
    save_figure,
    validation_batches,
    write_csv,
)
from image_classification.analysis.gradcam import GradCAM, cam_statistics
from image_classification.argparsing import ArgumentParser, run_program

PROG = "python -m image_classification.tools.gradcam"


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_data_flags(p, images_default=8)
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="CKPT",
                   help="classifier checkpoints to compare (same arch, classes and input)")
    p.add_argument("--labels", nargs="+", default=None, help="column titles (default: each checkpoint's operator)")
    p.add_argument("--layer", default=None, help="target layer name (default: layer4 / features)")
    p.add_argument("--target", default="predicted", choices=("predicted", "label"), help="class explained")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    check_data_flags(parser, args)
    if args.labels is not None and len(args.labels) != len(args.checkpoints):
        parser.error(f"--labels gives {len(args.labels)} names for {len(args.checkpoints)} checkpoints")

    def body() -> int:
        out = prepare_out(args.out)
        models = [load_classifier(path, args.arch, args.device) for path in args.checkpoints]
        first = models[0]
        for other in models[1:]:
            if (other.num_classes, other.in_chans) != (first.num_classes, first.in_chans):
                raise AnalysisError(f"{other.path} has {other.num_classes} classes / {other.in_chans} channels, "
                                    f"{first.path} {first.num_classes} / {first.in_chans}: not comparable")
        labels = args.labels or [m.conv if m.conv != "static" else "static" for m in models]
        cams = [GradCAM(m.model, args.layer) for m in models]
        batches, loaders = validation_batches(args, first)
        shown: List[torch.Tensor] = []
        results: List[List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in models]
        targets_all: List[torch.Tensor] = []
        for images, targets in batches:
            images = images.to(args.device)
            for i, cam in enumerate(cams):
                explained = targets if args.target == "label" else None
                maps, logits, classes = cam(images, explained)
                results[i].append((maps.cpu(), logits.softmax(1).cpu(), classes.cpu()))
            shown.append(denormalize(images, args.dataset))
            targets_all.append(targets.cpu())
        if not shown:
            raise AnalysisError("the validation set yielded no image")
        pictures = torch.cat(shown)
        truth = torch.cat(targets_all)
        per_model = [tuple(torch.cat(parts) for parts in zip(*res)) for res in results]
        rows = []
        for n in range(pictures.shape[0]):
            for label, (maps, probs, classes) in zip(labels, per_model):
                c = int(classes[n])
                rows.append({"image": n, "label": int(truth[n]), "model": label, "explained_class": c,
                             "predicted": int(probs[n].argmax()), "probability": float(probs[n, c]),
                             **cam_statistics(maps[n])})
        write_csv(f"{out}/gradcam.csv", rows)
        _figure(pictures, per_model, labels, truth, loaders.classes, f"{out}/gradcam.png")
        print(f"wrote {out}/gradcam.png and {out}/gradcam.csv ({pictures.shape[0]} images, {len(models)} models, "
              f"layer {cams[0].layer_name})")
        return 0

    return run_analysis(PROG, body)


def _figure(pictures: torch.Tensor, per_model: Sequence[tuple], labels: Sequence[str], truth: torch.Tensor,
            class_names: Optional[Sequence[str]], path: str) -> None:
    import matplotlib.pyplot as plt

    rows, cols = pictures.shape[0], 1 + len(per_model)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows), squeeze=False)

    def name(c: int) -> str:
        return str(class_names[c]) if class_names and c < len(class_names) else str(c)

    for r in range(rows):
        image = pictures[r].permute(1, 2, 0).numpy()
        gray = image.shape[-1] == 1
        shown = image[..., 0] if gray else image
        axes[r][0].imshow(shown, cmap="gray" if gray else None)
        axes[r][0].set_title(f"label {name(int(truth[r]))}", fontsize=8)
        for c, (label, (maps, probs, classes)) in enumerate(zip(labels, per_model), 1):
            axes[r][c].imshow(shown, cmap="gray" if gray else None)
            axes[r][c].imshow(maps[r].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            k = int(classes[r])
            axes[r][c].set_title(f"{label}: {name(k)} ({100 * float(probs[r, k]):.0f}%)", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("Grad-CAM (Selvaraju et al. 2017) of the explained class", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    run_program(main)
