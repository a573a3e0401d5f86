"""Write a tiny synthetic segmentation set in the ADE20K layout (smoke tests, trying the training script).

Usage: ``python -m image_classification.segmentation.synthetic OUT [--train 8] [--val 4] [--size 96]
[--classes 4] [--seed 0]``; then ``python -m image_classification.segmentation.train OUT --num-classes 4 ...``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .ade20k import write_synthetic_ade20k

PROG = "python -m image_classification.segmentation.synthetic"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output directory (created)")
    parser.add_argument("--train", type=int, default=8, help="training images")
    parser.add_argument("--val", type=int, default=4, help="validation images")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--classes", type=int, default=4, help="classes (1-6); label 0 is ignored background")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, low in (("train", 1), ("val", 1), ("size", 16)):
        if getattr(args, name) < low:
            parser.error(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if not 1 <= args.classes <= 6:
        parser.error(f"--classes must be in 1..6, got {args.classes}")
    try:
        write_synthetic_ade20k(args.out, args.train, args.val, args.size, args.classes, args.seed)
    except OSError as exc:
        parser.error(f"cannot write {args.out}: {exc.strerror or exc}")
    print(f"wrote {args.train} training and {args.val} validation images in the ADE20K layout under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
