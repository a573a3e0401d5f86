"""Train or evaluate an image classifier: ``python main.py DATA [flags]`` (``--help`` lists them).

Runs in one process on CPU or GPU, or one process per GPU under ``torchrun`` / ``multiproc.py``.
"""

from image_classification.training.trainer import main

if __name__ == "__main__":
    raise SystemExit(main())
