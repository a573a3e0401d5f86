"""Write a tiny synthetic detection set in the COCO layout (smoke tests, trying the training script).

Usage: ``python -m image_classification.detection.synthetic OUT [--train 8] [--val 4] [--size 320]
[--categories 3] [--seed 0]``; then ``python -m image_classification.detection.train OUT ...``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .coco import write_synthetic_coco

PROG = "python -m image_classification.detection.synthetic"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output directory (created)")
    parser.add_argument("--train", type=int, default=8, help="training images")
    parser.add_argument("--val", type=int, default=4, help="validation images")
    parser.add_argument("--size", type=int, default=320, help="image side in pixels")
    parser.add_argument("--categories", type=int, default=3, help="object categories (1-6)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, low in (("train", 1), ("val", 1), ("size", 32)):
        if getattr(args, name) < low:
            parser.error(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if not 1 <= args.categories <= 6:
        parser.error(f"--categories must be in 1..6, got {args.categories}")
    try:
        write_synthetic_coco(args.out, args.train, args.val, args.size, args.categories, args.seed)
    except OSError as exc:
        parser.error(f"cannot write {args.out}: {exc.strerror or exc}")
    print(f"wrote {args.train} training and {args.val} validation images in the COCO layout under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
