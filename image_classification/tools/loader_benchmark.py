"""Time the training input pipeline of every installed backend against this CPU's decode limit.

Usage::

    python -m image_classification.tools.loader_benchmark DATA [--images 384] [-b 32] [--image-size 224]
        [--backends pytorch dali-cpu] [-j 1 2] [--epochs 2] [--model-img-s 3000]

``DATA`` is an ImageFolder root with ``train/`` (ImageNet's layout). For each backend and worker count the
training loader runs over the same ``--images`` images (a warm-up epoch, then ``--epochs`` timed ones); a bare
loop in one process (read, ``decode_jpeg``, ``RandomResizedCrop``, flip on uint8) gives the limit per core; the
``pytorch`` backend's stages are timed per image. With ``--model-img-s`` it prints how many cores (workers) one
GPU needs at that training throughput. See :mod:`image_classification.measurement.input_pipeline`.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from image_classification.argparsing import ArgumentParser, run_program

__all__ = ["main"]

PROG = "python -m image_classification.tools.loader_benchmark"


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Time each data backend's training loader against the bare decode loop.")
    p.add_argument("data", help="ImageFolder root with train/ (and val/)")
    p.add_argument("--images", type=int, default=384, help="images per epoch, drawn from train/ (default 384)")
    p.add_argument("-b", "--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--image-size", type=int, default=224, help="training crop (default 224)")
    p.add_argument("--backends", nargs="+", default=None, help="backends to time (default: every installed one)")
    p.add_argument("-j", "--workers", type=int, nargs="+", default=[1, 2],
                   help="worker processes (DALI: threads) to try (default: 1 2)")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after a warm-up epoch (default 2)")
    p.add_argument("--model-img-s", type=float, default=None,
                   help="a model's training images per second on one GPU: print the cores it needs fed")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from image_classification.data import DataError
    from image_classification.measurement.input_pipeline import (
        bare_decode_limit,
        format_table,
        installed_backends,
        run,
        stage_times,
        usable_cores,
    )

    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("images", "batch_size", "image_size", "epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(w < 0 for w in args.workers):
        parser.error(f"-j/--workers must be >= 0, got {min(args.workers)}")
    if args.model_img_s is not None and not args.model_img_s > 0:
        parser.error(f"--model-img-s must be > 0, got {args.model_img_s}")
    if not os.path.isdir(os.path.join(args.data, "train")):
        parser.error(f"{args.data} has no train/ folder (the ImageFolder layout: DATA/train/CLASS/IMAGE)")
    available = installed_backends()
    backends = args.backends or available
    for name in backends:
        if name not in available:
            parser.error(f"backend {name!r} cannot run here (installed and usable: {', '.join(available)})")
    cores = usable_cores()
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"[loader] {args.data}: {args.images} images per epoch, -b {args.batch_size}, {args.image_size} px, "
          f"{args.epochs} timed epoch(s) after a warm-up; {cores} core(s) usable{load}", flush=True)
    try:
        timings = run(args.data, backends, args.workers, args.images, args.batch_size, args.image_size, args.epochs)
        print("[loader] the bare decode-and-crop loop (the limit of one core) ...", file=sys.stderr, flush=True)
        limit = bare_decode_limit(args.data, args.images, args.image_size, args.epochs)
        stages = stage_times(args.data, min(args.images, 64), args.image_size)
    except (DataError, ValueError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    for line in format_table(timings, limit, args.model_img_s):
        print(line)
    print("pytorch backend per image, one process: " + ", ".join(f"{k} {v:.2f} ms" for k, v in stages.items()))
    if args.model_img_s:
        best = max(timings, key=lambda t: t.per_worker, default=None)
        if best is not None:
            need = args.model_img_s / best.per_worker
            print(f"At {args.model_img_s:g} img/s per GPU the best pipeline here ({best.name}) needs {need:.1f} "
                  f"core(s) per GPU; the bare loop {args.model_img_s / limit.img_s:.1f}. A node with G GPUs needs G x "
                  f"that many cores for loading alone (this machine has {cores}).")
    return 0


if __name__ == "__main__":
    run_program(main)
