#!/usr/bin/env python
"""Classify images with a trained checkpoint (DeepLearningExamples' ``classify.py``).

    python classify.py CHECKPOINT IMAGE [IMAGE ...] [--topk 5] [--class-names FILE] [--device cpu|cuda|auto]

Same as ``python -m image_classification.tools.classify``; see image_classification/tools/classify.py.
"""


import sys

try:
    from image_classification.argparsing import run_program
    from image_classification.tools.classify import main
except ImportError as exc:  # the package's own check of the torch it runs on: one line, not a traceback
    if not str(exc).startswith("image_classification "):
        raise
    sys.exit(f"classify.py: error: {exc}")

if __name__ == "__main__":
    run_program(main)
