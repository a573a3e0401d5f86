"""Write a tiny synthetic segmentation set in the ADE20K layout (smoke tests, trying the training script).

Usage: ``python -m image_classification.tools.synthetic_segmentation OUT [--train 8] [--val 4] [--size 96]
[--classes 4] [--seed 0]``; then ``python -m image_classification.tools.train_segmentation OUT --num-classes 4 ...``.
"""

from __future__ import annotations

from typing import Optional, Sequence

from image_classification.argparsing import run_program
from image_classification.segmentation.ade20k import write_synthetic_ade20k
from image_classification.tools.synthetic_cli import SyntheticSetCli, synthetic_set_main

PROG = "python -m image_classification.tools.synthetic_segmentation"
CLI = SyntheticSetCli(prog=PROG, description=__doc__.split("\n\n")[0], layout="ADE20K", write=write_synthetic_ade20k,
                      labels_flag="classes", labels_help="classes (1-6); label 0 is ignored background",
                      labels_default=4, size_default=96, size_min=16)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return synthetic_set_main(CLI, argv)


if __name__ == "__main__":
    run_program(main)
