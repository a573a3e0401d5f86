"""Profiler: parameters, multiply-adds and CPU/GPU latency of an (arch, operator, placement) triple.

Usage::

    python -m image_classification.tools.profiler --arch resnet18 --conv pedconv [--image-size 224]
        [--placement paper] [--num-classes 1000] [--in-chans 3] [--json]
        [--latency [--threads 2 --images 200 --warmup 20 --train-batch 32 --train-steps 8]
                   [--compile] [--no-autotune] [--print-paths] [--no-rss]
                   [--device cpu|cuda|auto] [--amp none|fp16|bf16] [--channels-last]]
        [--table pedconv|dcd|odconv|all|dense]

Counts follow :mod:`image_classification.measurement.macs` (deploy parameters exclude PEDConv's training-only
info-max decoder; MACs per the papers' convention). ``--latency`` measures, in one run and
interleaved with the static model built the same way (same arch, classes, channels, init):
batch-1 inference latency (median over ``--images`` single images after ``--warmup``;
PEDConv appendix, Sec. B, Table 1), the median time of a batch-32 training step (forward, loss incl. info-max
term, backward, SGD step), and the training memory (parameters + gradients + momentum + every
tensor saved for backward, deduplicated by storage; on CPU the allocator exposes no peak counter,
and this sum is the dominant, deterministic part of the peak) and the peak RSS of a training step of each
model, measured in a spawned process (Linux). PEDConv ``path=auto`` layers are autotuned before timing
(``--no-autotune``: the shape heuristic); the path of every layer is in the JSON (``paths``) and printed
with ``--print-paths``. It also counts the aten calls and Python function calls of one batch-1 eval
forward of each model (``calls_*``; the difference per dynamic layer is what the operator adds beyond
the arithmetic). ``--compile`` times both models under ``torch.compile`` (inductor, static
shapes; batch-1 inference also with inductor freezing, where every BatchNorm that follows a conv is
first folded into it on BOTH sides, :func:`image_classification.deployment.bn_folding.fold_batchnorm`: freezing
folds it into a static conv's constant weight by itself, but cannot see through PEDConv's per-sample
weight, so without this the static side alone would lose its BatchNorms). ``--table`` prints the papers' tables next to
this project's counts, one row per (arch, operator, placement).

``--device cuda`` runs the latency measurements on the GPU: every timed call is bracketed by CUDA events
after a synchronisation (:func:`image_classification.timing.time_calls`), after the same warm-up;
``--amp fp16|bf16`` runs both models under autocast (fp16 training steps with a GradScaler, as main.py),
``--channels-last`` converts models and inputs to channels_last. On CUDA the report adds the peak
allocated memory of a training step (``train_peak_mb_*``) and skips the peak RSS; on every device it
gives the training throughput in images/s (``train_img_s_*``, ``throughput_ratio`` = dynamic / static).
It is not named ``profile``: a module of that name shadows the standard library's (which ``cProfile``
imports) whenever the package directory is on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from image_classification.argparsing import ArgumentParser, non_negative_int, positive_int, run_program
from image_classification.atomic_files import write_json_atomic
from image_classification.dynamic import autotune
from image_classification.measurement.latency import measure_latency
from image_classification.measurement.paper_tables import (
    dense_table_rows,
    format_dense_table,
    format_table,
    profile_model,
    table_rows,
)
from image_classification.models import list_archs
from image_classification.timing import (
    AMP_DTYPES,
    resolve_device,
)

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m image_classification.tools.profiler", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", help=f"architecture ({', '.join(list_archs())})")
    p.add_argument("--conv", default="static", help="operator spec, e.g. pedconv, pedconv:rank=4, dcd, static")
    p.add_argument("--placement", default=None, help="placement (paper, all, pointwise, depthwise, shallow, "
                   "deep, none, +stem/+shortcut/+se/+cls/+share/+last; see image_classification/models/convert.py; "
                   "default: the operator's, as main.py: paper, involution paper+last)")
    p.add_argument("--image-size", type=positive_int, default=None, help="input size (default: the arch's paper size)")
    p.add_argument("--num-classes", type=positive_int, default=1000)
    p.add_argument("--in-chans", type=positive_int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out-json", type=Path, default=None,
                   help="also write the JSON report to this file (atomically; its directory must exist)")
    p.add_argument("--latency", action="store_true", help="latency/training-step/memory ratios vs static")
    p.add_argument("--device", default="cpu", help="with --latency: cpu (default), cuda[:N] (CUDA-event timing) "
                   "or auto")
    p.add_argument("--amp", default="none", choices=tuple(AMP_DTYPES),
                   help="with --latency: autocast dtype of both models (fp16 training uses a GradScaler)")
    p.add_argument("--channels-last", action="store_true", help="with --latency: channels_last models and inputs")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--images", type=positive_int, default=200, help="timed batch-1 inferences (paper: 5000)")
    p.add_argument("--warmup", type=non_negative_int, default=20)
    p.add_argument("--train-batch", type=positive_int, default=32)
    p.add_argument("--train-steps", type=positive_int, default=8)
    p.add_argument("--compile", action="store_true",
                   help="with --latency: torch.compile both models (inductor; batch-1 also with freezing)")
    p.add_argument("--no-autotune", dest="autotune", action="store_false",
                   help="PEDConv path=auto: the shape heuristic instead of timing the paths of every layer")
    p.add_argument("--print-paths", action="store_true",
                   help="with --latency: print the path of every PEDConv layer (always in --json)")
    p.add_argument("--no-rss", dest="rss", action="store_false",
                   help="with --latency: skip the peak-RSS measurement (two spawned processes)")
    p.add_argument("--table", choices=("pedconv", "dcd", "odconv", "all", "dense"),
                   help="papers' count tables vs this project's (dense: detection/segmentation, Tables 2-3)")
    return p


def format_report(report: Dict[str, Any]) -> str:
    """The human-readable report of :func:`main`'s measurements (``--json`` prints ``report`` itself)."""
    lines: List[str] = []
    out = lines.append
    out(f"arch {report['arch']}  conv {report['conv']}  placement {report['placement']}  "
        f"image {report['image_size']}  classes {report['num_classes']}  in_chans {report['in_chans']}")
    out(f"  dynamic layers     {report['dynamic_layers']}")
    out(f"  params (deploy)    {report['params_deploy'] / 1e6:.3f}M")
    out(f"  params (training)  {report['params_training'] / 1e6:.3f}M")
    out(f"  MACs               {report['macs'] / 1e6:.1f}M")
    if "static_macs" in report:
        out(f"  static baseline    {report['static_params_deploy'] / 1e6:.3f}M params, "
            f"{report['static_macs'] / 1e6:.1f}M MACs")
    lat = report.get("latency")
    if lat:
        where = (f"{lat['device_name']}" if lat["device"] == "cuda" else f"{lat['threads']} threads")
        out(f"  device             {lat['device']} ({where})  amp {lat['amp']}  "
            f"{'channels_last' if lat['channels_last'] else 'NCHW'}")
        out(f"  batch-1 inference  {lat['infer_ms_dynamic']:.2f} ms vs static {lat['infer_ms_static']:.2f} ms"
            f"  ratio {lat['infer_ratio']:.3f}  (median of {lat['images']})")
        out(f"  training step b{lat['train_batch']}  {lat['train_ms_dynamic']:.1f} ms vs static "
            f"{lat['train_ms_static']:.1f} ms  ratio {lat['train_ratio']:.3f}")
        out(f"  train throughput   {lat['train_img_s_dynamic']:.1f} img/s vs static {lat['train_img_s_static']:.1f} "
            f"img/s  ratio {lat['throughput_ratio']:.3f}")
        if lat.get("peak_memory_ratio") is not None:
            out(f"  CUDA peak (step)   {lat['train_peak_mb_dynamic']:.0f} MB vs static "
                f"{lat['train_peak_mb_static']:.0f} MB  ratio {lat['peak_memory_ratio']:.3f}")
        out(f"  training memory    {lat['train_mem_mb_dynamic']:.0f} MB vs static {lat['train_mem_mb_static']:.0f} MB"
            f"  ratio {lat['memory_ratio']:.3f}  (parameters, gradients, momentum, saved tensors)")
        if lat.get("rss_ratio") is not None:
            out(f"  peak RSS (step)    {lat['rss_mb_dynamic']:.0f} MB vs static {lat['rss_mb_static']:.0f} MB"
                f"  ratio {lat['rss_ratio']:.3f}")
        if lat.get("calls_dynamic"):
            layers = max(report["dynamic_layers"], 1)
            extra = {k: (lat["calls_dynamic"][k] - lat["calls_static"][k]) / layers for k in ("aten", "python")}
            out(f"  batch-1 calls      aten {lat['calls_dynamic']['aten']} vs static {lat['calls_static']['aten']}"
                f" ({extra['aten']:+.1f} per dynamic layer), Python {lat['calls_dynamic']['python']} vs "
                f"{lat['calls_static']['python']} ({extra['python']:+.1f} per layer)")
        if lat.get("compile"):
            folded = lat.get("frozen_bn_folded", {})
            out(f"  compiled batch-1 with inductor freezing  {lat['infer_ms_dynamic_frozen']:.2f} ms vs static "
                f"{lat['infer_ms_static_frozen']:.2f} ms  ratio {lat['infer_ratio_frozen']:.3f}  (BatchNorm folded "
                f"on both sides first: {folded.get('dynamic', 0)} and {folded.get('static', 0)} pairs)")
        out(f"  execution          {'torch.compile (inductor)' if lat.get('compile') else 'eager'}, PEDConv paths "
            f"{'autotuned' if lat.get('autotune') else 'by heuristic'}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    if args.out_json is not None and not args.out_json.parent.is_dir():
        parser.error(f"--out-json {args.out_json}: directory {args.out_json.parent} does not exist")
    if args.table == "dense":  # SSD300 / PSPNet / UperNet
        dense = dense_table_rows()
        print(json.dumps(dense, indent=1) if args.json else format_dense_table(dense))
        return 0
    if args.table:
        rows = table_rows(args.table)
        print(json.dumps(rows, indent=1) if args.json else format_table(rows))
        if not args.arch:
            return 0
    if not args.arch:
        parser.error("--arch is required (or --table)")
    try:
        if args.placement is None:
            from image_classification.dynamic.registry import operator_class

            args.placement = operator_class(args.conv).default_placement
        report = profile_model(args.arch, args.conv, args.placement, args.image_size, args.num_classes, args.in_chans)
        if args.conv != "static" or args.placement != "paper":
            base = profile_model(args.arch, "static", "paper", report["image_size"], args.num_classes, args.in_chans)
            report["static_params_deploy"], report["static_macs"] = base["params_deploy"], base["macs"]
        if args.latency:
            autotune.set_autotune(None if args.autotune else False)
            report["latency"] = measure_latency(
                args.arch, args.conv, placement=args.placement, image_size=report["image_size"],
                num_classes=args.num_classes, in_chans=args.in_chans, threads=args.threads, images=args.images,
                warmup=args.warmup, train_batch=args.train_batch, train_steps=args.train_steps, compile=args.compile,
                peak_rss=args.rss, device=args.device, amp=args.amp, channels_last=args.channels_last)
            report["latency"]["autotune"] = autotune.autotune_enabled()
    except ValueError as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback (the tuned paths so far stay in the path cache)
        print("profiler: interrupted; nothing measured is printed (a latency ratio needs every step)", file=sys.stderr,
              flush=True)
        return 130
    finally:
        autotune.set_autotune(None)
    if args.out_json is not None:
        write_json_atomic(args.out_json, report)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(format_report(report))
    if report.get("latency") and args.print_paths:
        from image_classification.dynamic import format_path_report

        print(format_path_report(report["latency"]["paths"]))
    return 0


if __name__ == "__main__":
    run_program(main)
