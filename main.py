"""Train or evaluate an image classifier: ``python main.py DATA [flags]`` (``--help`` lists them).

Runs in one process on CPU or GPU, or one process per GPU under ``torchrun`` / ``multiproc.py``.
"""

if __name__ == "__main__":
    import sys

    # the parser first: --help and a bad flag answer before the trainer imports torch's compiler stack
    try:
        from image_classification.training.cli import parse_args
    except ImportError as exc:  # the package's own check of the torch it runs on: one line, not a traceback
        if not str(exc).startswith("image_classification "):
            raise
        sys.exit(f"main.py: error: {exc}")

    args = parse_args()
    from image_classification.training.trainer import run_parsed

    raise SystemExit(run_parsed(args))
