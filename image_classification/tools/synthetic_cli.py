"""The command line of the dense tasks' synthetic-set writers (``python -m
image_classification.tools.synthetic_detection`` and ``...tools.synthetic_segmentation``):
one parser, one set of checks, one-line errors with exit status 2."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from image_classification.argparsing import ArgumentParser

__all__ = ["SyntheticSetCli", "synthetic_set_main"]


@dataclass(frozen=True)
class SyntheticSetCli:
    """What differs between the writers: the layout, the writer and its label flag, and the image sizes."""

    prog: str
    description: str
    layout: str  # "COCO", "ADE20K": said in the closing line
    write: Callable[[str, int, int, int, int, int], object]  # (out, train, val, size, labels, seed) -> root
    labels_flag: str  # "categories" (detection) or "classes" (segmentation): 1..6
    labels_help: str
    labels_default: int
    size_default: int
    size_min: int


def synthetic_set_main(cli: SyntheticSetCli, argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``OUT [--train N] [--val N] [--size PX] [--<labels> N] [--seed S]`` and write the set."""
    parser = ArgumentParser(prog=cli.prog, description=cli.description)
    parser.add_argument("out", help="output directory (created)")
    parser.add_argument("--train", type=int, default=8, help="training images")
    parser.add_argument("--val", type=int, default=4, help="validation images")
    parser.add_argument("--size", type=int, default=cli.size_default, help="image side in pixels")
    parser.add_argument(f"--{cli.labels_flag}", dest="labels", type=int, default=cli.labels_default,
                        help=cli.labels_help)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, low in (("train", 1), ("val", 1), ("size", cli.size_min)):
        if getattr(args, name) < low:
            parser.error(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if not 1 <= args.labels <= 6:
        parser.error(f"--{cli.labels_flag} must be in 1..6, got {args.labels}")
    try:
        cli.write(args.out, args.train, args.val, args.size, args.labels, args.seed)
    except OSError as exc:
        parser.error(f"cannot write {args.out}: {exc.strerror or exc}")
    print(f"wrote {args.train} training and {args.val} validation images in the {cli.layout} layout under {args.out}")
    return 0
