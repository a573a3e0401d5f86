"""Time the training input pipeline of every installed backend against this CPU's decode limit, and (``--feed``) as
the feed of a real training step.

Usage::

    python -m image_classification.tools.loader_benchmark DATA [--images 384] [-b 32] [--image-size 224]
        [--backends pytorch dali-cpu] [-j 1 2] [--epochs 2] [--model-img-s 3000]
        [--feed resnet18 [--feed-seconds 10] [--device cuda]] [--write-sample-images N] [--json PATH]

``DATA`` is an ImageFolder root with ``train/`` (ImageNet's layout). For each backend and worker count the
training loader runs over the same ``--images`` images (a warm-up epoch, then ``--epochs`` timed ones, each timed
in its steady state); a bare loop in one process (read, ``decode_jpeg``, ``RandomResizedCrop``, flip on uint8)
gives the limit per core; the ``pytorch`` backend's stages are timed per image. With ``--model-img-s`` it prints
how many cores (workers) one GPU needs at that training throughput. ``--feed ARCH`` also times ARCH's training
step (AMP fp16 and channels-last on CUDA) fed by each backend at the largest ``-j`` and by synthetic data on the
device: a ratio below 1 means the run is data-bound. ``--write-sample-images N`` first writes N sample JPEGs of
ImageNet's size to an empty or missing ``DATA`` (machines without a dataset: the GPU checks). See
:mod:`image_classification.measurement.input_pipeline`.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from typing import Optional, Sequence

from image_classification.argparsing import ArgumentParser, non_negative_int, positive_float, positive_int, run_program

__all__ = ["main"]

PROG = "python -m image_classification.tools.loader_benchmark"


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Time each data backend's training loader against the bare decode loop.")
    p.add_argument("data", help="ImageFolder root with train/ (and val/)")
    p.add_argument("--images", type=positive_int, default=384, help="images per epoch, drawn from train/ (default 384)")
    p.add_argument("-b", "--batch-size", type=positive_int, default=32, help="batch size (default 32)")
    p.add_argument("--image-size", type=positive_int, default=224, help="training crop (default 224)")
    p.add_argument("--backends", nargs="+", default=None, help="backends to time (default: every installed one)")
    p.add_argument("-j", "--workers", type=non_negative_int, nargs="+", default=[1, 2],
                   help="worker processes (DALI: threads) to try (default: 1 2)")
    p.add_argument("--epochs", type=positive_int, default=2, help="timed epochs after a warm-up epoch (default 2)")
    p.add_argument("--model-img-s", type=positive_float, default=None,
                   help="a model's training images per second on one GPU: print the cores it needs fed")
    p.add_argument("--feed", metavar="ARCH", default=None,
                   help="also time ARCH's training step fed by each backend (largest -j) and by synthetic data")
    p.add_argument("--feed-seconds", type=positive_float, default=10.0,
                   help="timed seconds per --feed pipeline (default 10)")
    p.add_argument("--device", default=None, help="--feed's device (default: cuda when available, else cpu)")
    p.add_argument("--write-sample-images", type=int, default=None, metavar="N",
                   help="first write N sample JPEGs (500x375) to DATA, which must be missing or empty")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every figure to PATH as JSON")
    return p


def _check(parser: ArgumentParser, args: argparse.Namespace) -> None:
    if args.write_sample_images is not None:
        if args.write_sample_images < 8:
            parser.error(f"--write-sample-images must be >= 8 (one per class), got {args.write_sample_images}")
        if os.path.exists(args.data) and (not os.path.isdir(args.data) or os.listdir(args.data)):
            parser.error(f"--write-sample-images writes to a missing or empty folder; {args.data} is not one")
    elif not os.path.isdir(os.path.join(args.data, "train")):
        parser.error(f"{args.data} has no train/ folder (the ImageFolder layout: DATA/train/CLASS/IMAGE)")
    if args.feed is not None:
        from image_classification.models import list_archs

        if args.feed not in list_archs():
            parser.error(f"--feed: unknown architecture {args.feed!r}; valid: {', '.join(list_archs())}")
    if args.device is not None:
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device: {args.device!r} is not a device (cpu, cuda, cuda:1)")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU is available here; leave --device out to use the CPU")


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    from image_classification.data import DataError
    from image_classification.measurement.input_pipeline import (
        bare_decode_limit,
        format_feed_table,
        format_table,
        installed_backends,
        run,
        stage_times,
        time_training_feed,
        usable_cores,
        write_sample_jpegs,
    )

    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    available = installed_backends()
    backends = args.backends or available
    for name in backends:
        if name not in available:
            parser.error(f"backend {name!r} cannot run here (installed and usable: {', '.join(available)})")
    if args.write_sample_images is not None:
        write_sample_jpegs(args.data, args.write_sample_images)
    cores = usable_cores()
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"[loader] {args.data}: {args.images} images per epoch, -b {args.batch_size}, {args.image_size} px, "
          f"{args.epochs} timed epoch(s) after a warm-up; {cores} core(s) usable{load}", flush=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    feeds = []
    try:
        timings = run(args.data, backends, args.workers, args.images, args.batch_size, args.image_size, args.epochs)
        print("[loader] the bare decode-and-crop loop (the limit of one core) ...", file=sys.stderr, flush=True)
        limit = bare_decode_limit(args.data, args.images, args.image_size, args.epochs)
        stages = stage_times(args.data, min(args.images, 64), args.image_size)
        if args.feed is not None:
            workers = max(args.workers)
            for name in [*backends, "synthetic"]:
                print(f"[loader] {args.feed} training step on {device} fed by {name} (~{args.feed_seconds:g} s) ...",
                      file=sys.stderr, flush=True)
                feeds.append(time_training_feed(args.data, name, workers, args.feed, args.images, args.batch_size,
                                                args.image_size, device, args.feed_seconds))
    except (DataError, ValueError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    lines = format_table(timings, limit, args.model_img_s)
    lines.append("pytorch backend per image, one process: " + ", ".join(f"{k} {v:.2f} ms" for k, v in stages.items()))
    if args.model_img_s:
        best = max(timings, key=lambda t: t.per_worker, default=None)
        if best is not None:
            need = args.model_img_s / best.per_worker
            lines.append(f"At {args.model_img_s:g} img/s per GPU the best pipeline here ({best.name}) needs "
                         f"{need:.1f} core(s) per GPU; the bare loop {args.model_img_s / limit.img_s:.1f}. A node with "
                         f"G GPUs needs G x that many cores for loading alone (this machine has {cores}).")
    if feeds:
        lines += ["", *format_feed_table(args.feed, feeds[:-1], feeds[-1])]
    print("\n".join(lines))
    if args.json:
        from image_classification.atomic_files import write_json_atomic

        report = {"data": args.data, "images": args.images, "batch_size": args.batch_size,
                  "image_size": args.image_size, "cores": cores, "device": str(device), "feed_arch": args.feed,
                  "loaders": [asdict(t) for t in timings], "bare_loop": asdict(limit), "stages_ms": stages,
                  "feeds": [asdict(t) for t in feeds], "markdown": lines}
        write_json_atomic(args.json, report)
    return 0


if __name__ == "__main__":
    run_program(main)
