"""Write a tiny synthetic detection set in the COCO layout (smoke tests, trying the training script).

Usage: ``python -m image_classification.tools.synthetic_detection OUT [--train 8] [--val 4] [--size 320]
[--categories 3] [--seed 0]``; then ``python -m image_classification.tools.train_detection OUT ...``.
"""

from __future__ import annotations

from typing import Optional, Sequence

from image_classification.argparsing import run_program
from image_classification.detection.coco import write_synthetic_coco
from image_classification.tools.synthetic_cli import SyntheticSetCli, synthetic_set_main

PROG = "python -m image_classification.tools.synthetic_detection"
CLI = SyntheticSetCli(prog=PROG, description=__doc__.split("\n\n")[0], layout="COCO", write=write_synthetic_coco,
                      labels_flag="categories", labels_help="object categories (1-6)", labels_default=3,
                      size_default=320, size_min=32)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return synthetic_set_main(CLI, argv)


if __name__ == "__main__":
    run_program(main)
