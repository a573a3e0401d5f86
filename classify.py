#!/usr/bin/env python
"""Classify images with a trained checkpoint (DeepLearningExamples' ``classify.py``).

    python classify.py CHECKPOINT IMAGE [IMAGE ...] [--topk 5] [--class-names FILE] [--device cpu|cuda|auto]

Same as ``python -m image_classification.tools.classify``; see image_classification/tools/classify.py.
"""


from image_classification.argparsing import run_program
from image_classification.tools.classify import main

if __name__ == "__main__":
    run_program(main)
