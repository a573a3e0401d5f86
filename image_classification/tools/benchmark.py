"""Micro-benchmark of the dynamic operators against nn.Conv2d on representative layer shapes.

Usage::

    python -m image_classification.tools.benchmark [--ops pedconv,dcd,pedconv:path=patch_gemm,...]
        [--shapes r18-3x3-64@56,...] [--batch-sizes 1,32] [--threads 2] [--repeats 3]
        [--device cpu|cuda|auto] [--amp none|fp16|bf16] [--channels-last] [--all-paths]
        [--compile] [--no-autotune] [--json]

``--ops`` takes operator specs (``pedconv:path=fold`` times one PEDConv path; plain ``pedconv`` uses
``path=auto``, whose choice per batch size is reported in the ``paths`` column). ``--compile`` times
``torch.compile(fullgraph=True)`` of every module, nn.Conv2d included (both sides compiled alike).
``--all-paths`` adds ``pedconv:path=NAME`` for every registered PEDConv path but ``reference``; a path that
cannot run a shape on this device (e.g. ``triton`` off CUDA) is skipped with its one-line reason.

``--device cuda`` times on the GPU with CUDA events (:func:`image_classification.timing.time_calls`:
synchronise, record, run, record, wait for the end event), after the same warm-up calls as on the CPU;
``--amp fp16|bf16`` runs every module under ``torch.autocast`` (the static conv included) and
``--channels-last`` gives modules and inputs the channels_last memory format (the fast layout of
tensor-core convolutions). ``--device cuda`` without CUDA is a one-line error.

For every layer shape, batch size and operator it reports, as ratios to a plain ``nn.Conv2d`` of
the same geometry measured in the same run:

* ``fwd``: time of an inference forward (``eval()``, ``torch.no_grad()``);
* ``train``: time of a training forward + backward (input gradient included, as inside a
  network), also as training throughput (``img/s`` = batch / train time, the operator's and nn.Conv2d's);
* ``mem``: memory of a training step of the layer followed by a BatchNorm, as inside the networks (a
  layer output saved for backward is then shared with BatchNorm's saved input). On CUDA: peak
  allocated memory during forward + backward above what was allocated before. On CPU (where
  allocator statistics are not available): the bytes of the distinct non-parameter tensors autograd
  saves for backward (``torch.autograd.graph.saved_tensors_hooks``), i.e. what a training step keeps
  alive per layer between forward and backward - the dominant term of activation memory.

Measurements are interleaved (every repeat times the static conv and each operator in turn) so
that drifts in machine load hit all of them alike; each sample averages enough back-to-back calls
to last ~20 ms, and ratios use the minimum sample (other processes only ever add time). An operator that cannot
build a shape (e.g. a 3x3-only operator on a 1x1 layer) is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from image_classification.argparsing import ArgumentParser, non_negative_int, positive_int, run_program
from image_classification.atomic_files import write_json_atomic
from image_classification.dynamic import build_conv, list_operators, parse_spec
from image_classification.dynamic.autotune import set_autotune
from image_classification.dynamic.pedconv import PEDConv2d
from image_classification.dynamic.pedconv.paths import PATH_REGISTRY
from image_classification.measurement.memory import cuda_peak_bytes, saved_tensor_storages
from image_classification.timing import (
    AMP_DTYPES,
    autocast_context,
    calls_for_duration,
    interleaved_samples,
    memory_format,
    resolve_device,
)

__all__ = ["LayerShape", "SHAPES", "DEFAULT_SHAPES", "run_benchmark", "main"]


@dataclass(frozen=True)
class LayerShape:
    """A conv layer geometry and its input resolution."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int
    groups: int
    size: int
    help: str = ""


SHAPES: Dict[str, LayerShape] = {
    s.name: s
    for s in (
        LayerShape("r18-3x3-64@56", 64, 64, 3, 1, 1, 1, 56, "ResNet-18 layer1 3x3"),
        LayerShape("r18-3x3-128@28", 128, 128, 3, 1, 1, 1, 28, "ResNet-18 layer2 3x3"),
        LayerShape("r18-3x3-256@14", 256, 256, 3, 1, 1, 1, 14, "ResNet-18 layer3 3x3"),
        LayerShape("r18-3x3-512@7", 512, 512, 3, 1, 1, 1, 7, "ResNet-18 layer4 3x3"),
        LayerShape("r18-3x3s2-64-128@56", 64, 128, 3, 2, 1, 1, 56, "ResNet-18 layer2 first 3x3 (stride 2)"),
        LayerShape("r50-1x1-64-256@56", 64, 256, 1, 1, 0, 1, 56, "ResNet-50 layer1 1x1 expansion"),
        LayerShape("r50-1x1-256-64@56", 256, 64, 1, 1, 0, 1, 56, "ResNet-50 layer1 1x1 reduction"),
        LayerShape("r50-1x1-2048-512@7", 2048, 512, 1, 1, 0, 1, 7, "ResNet-50 layer4 1x1 reduction"),
        LayerShape("mbv2-1x1-24-144@56", 24, 144, 1, 1, 0, 1, 56, "MobileNetV2 1x1 expansion"),
        LayerShape("mbv2-1x1-144-24@56", 144, 24, 1, 1, 0, 1, 56, "MobileNetV2 1x1 projection"),
        LayerShape("mbv2-dw3x3-144@28", 144, 144, 3, 1, 1, 144, 28, "MobileNetV2 depthwise 3x3"),
        LayerShape("tiny", 16, 16, 3, 1, 1, 1, 8, "tiny shape for tests"),
    )
}
DEFAULT_SHAPES = ("r18-3x3-64@56", "r18-3x3-256@14", "r18-3x3-512@7", "r50-1x1-64-256@56", "mbv2-dw3x3-144@28")


@dataclass
class Row:
    shape: str
    op: str
    batch: int
    fwd_ratio: Optional[float] = None
    train_ratio: Optional[float] = None
    mem_ratio: Optional[float] = None
    static_fwd_ms: Optional[float] = None
    static_train_ms: Optional[float] = None
    train_img_s: Optional[float] = None  # training throughput of the operator (batch / train time)
    static_train_img_s: Optional[float] = None
    paths: str = ""  # PEDConv path=auto: the path chosen for inference / training at this batch size
    note: str = ""
    train_note: str = ""  # why no training step was timed (e.g. ODConv's attention BatchNorm at batch 1)


def _fwd_fn(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, amp: str = "none") -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad(), autocast_context(x.device, amp):
            module(x)

    return run


def _train_fn(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              params: Sequence[nn.Parameter], amp: str = "none") -> Callable[[], None]:
    xg = x.detach().clone().requires_grad_(True)

    def run() -> None:
        for p in params:
            p.grad = None
        xg.grad = None
        with autocast_context(x.device, amp):
            out = module(xg)
        out.backward(torch.ones_like(out))

    return run


def _measure(fns: Dict[str, Callable[[], None]], device: torch.device, repeats: int, warmup: int,
             target_s: float) -> Dict[str, float]:
    """Interleaved timing (:func:`image_classification.timing.interleaved_samples`), every sample as many calls as
    make the static conv's last ``target_s``; the minimum per function, in seconds per call.

    The minimum (as ``timeit`` recommends) is used because other processes only ever add time;
    on a shared machine the median still carries their noise.
    """
    interleaved_samples(fns, device, 0, warmup=warmup)
    number = calls_for_duration(fns["static"], device, target_s, trials=3)
    samples = interleaved_samples(fns, device, repeats, number=number)
    return {name: min(values) for name, values in samples.items()}


def _train_memory(module: nn.Module, x: torch.Tensor, device: torch.device, amp: str = "none") -> float:
    """Bytes of a training step of ``module`` + BatchNorm: CUDA peak above baseline, or distinct
    saved-for-backward tensors on CPU."""
    xg = x.detach().clone().requires_grad_(True)
    training = module.training
    module.eval()  # one sample in eval mode: an attention BatchNorm (ODConv) cannot train on one
    with torch.no_grad():
        channels = module(x[:1]).shape[1]
    module.train(training)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    module = nn.Sequential(module, nn.BatchNorm2d(channels)).to(x.device).to(memory_format=fmt).train()

    def step() -> None:
        with autocast_context(device, amp):
            out = module(xg)
        out.backward(torch.ones_like(out))

    if device.type == "cuda":
        return cuda_peak_bytes(step, device)
    # the parameters live anyway; count what the step adds
    with saved_tensor_storages(exclude=(p.untyped_storage().data_ptr() for p in module.parameters())) as seen:
        step()
    return float(sum(seen.values()))


def _auto_paths(module: nn.Module, batch: int) -> str:
    """``eval:PATH train:PATH`` for a PEDConv with ``path=auto`` at ``batch`` (empty for others)."""
    if not isinstance(module, PEDConv2d) or module.path != "auto":
        return ""
    seen = {grad: entry["path"] for (shape, grad), entry in module.logged_paths().items() if shape[0] == batch}
    return " ".join(f"{'train' if grad else 'eval'}:{seen[grad]}" for grad in (False, True) if grad in seen)


def _compiled(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.compile(module, fullgraph=True, dynamic=False)


def run_benchmark(
    ops: Sequence[str],
    shapes: Sequence[str] = DEFAULT_SHAPES,
    batch_sizes: Sequence[int] = (1, 32),
    repeats: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    log: Optional[Callable[[str], None]] = None,
    target_s: float = 0.02,
    compile: bool = False,
    amp: str = "none",
    channels_last: bool = False,
    on_progress: Optional[Callable[[List[Row]], None]] = None,
) -> List[Row]:
    """Measure every (shape, batch, op) and return the rows (ratios to nn.Conv2d in the same run).

    ``ops`` are operator specs; ``compile`` times ``torch.compile(fullgraph=True)`` of every module;
    ``amp`` (none/fp16/bf16) runs all modules under autocast; ``channels_last`` converts modules and inputs.
    An operator whose first forward on a shape raises ValueError (e.g. a path that does not apply on this
    device) is reported as skipped with the message. ``on_progress(rows)`` is called with the rows so far
    after every (shape, batch) (the CLI rewrites ``--out-json`` then, so a run cut short keeps its rows).
    """
    dev = resolve_device(device) if isinstance(device, str) else device
    fmt = memory_format(channels_last)
    rows: List[Row] = []
    started, count, cells = time.perf_counter(), 0, len(shapes) * len(batch_sizes)
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        static, modules, notes = _build_modules(shape, ops, dev, fmt)
        for batch in batch_sizes:
            count += 1
            if log:
                log(f"  [{count}/{cells}] {shape_name} batch {batch}: {len(ops) + 1} modules, interleaved "
                    f"({time.perf_counter() - started:.0f} s so far) ...")
            x = torch.randn(batch, shape.in_channels, shape.size, shape.size, device=dev).contiguous(memory_format=fmt)
            rows += _measure_cell(shape_name, ops, x, static, modules, notes, dev, amp=amp, compile=compile,
                                  repeats=repeats, warmup=warmup, target_s=target_s)
            if on_progress is not None:
                on_progress(list(rows))
    return rows


def _build_modules(shape: Any, ops: Sequence[str], dev: torch.device, fmt: torch.memory_format
                   ) -> Tuple[nn.Module, Dict[str, nn.Module], Dict[str, str]]:
    """The seeded nn.Conv2d of ``shape``, every operator of ``ops`` that builds for it, and why the others do not."""
    geometry: Dict[str, Any] = dict(stride=shape.stride, padding=shape.padding, groups=shape.groups, bias=False)
    torch.manual_seed(0)
    static = nn.Conv2d(shape.in_channels, shape.out_channels, shape.kernel_size, **geometry).to(dev)
    static = static.to(memory_format=fmt)
    modules: Dict[str, nn.Module] = {}
    notes: Dict[str, str] = {}
    for op in ops:
        try:
            conv = build_conv(op, shape.in_channels, shape.out_channels, shape.kernel_size, **geometry)
            modules[op] = conv.to(dev).to(memory_format=fmt)
        except (ValueError, NotImplementedError) as exc:
            notes[op] = f"skipped: {exc}"
    return static, modules, notes


def _measure_cell(shape_name: str, ops: Sequence[str], x: torch.Tensor, static: nn.Module,
                  modules: Dict[str, nn.Module], notes: Dict[str, str], dev: torch.device, *, amp: str,
                  compile: bool, repeats: int, warmup: int, target_s: float) -> List[Row]:
    """One (shape, batch): forward and training step of every module that runs on ``x``, interleaved with the
    static conv, and their training memory; a row per operator (a note where it was skipped)."""
    batch = x.shape[0]
    runnable = {}
    batch_notes = dict(notes)
    for op, m in modules.items():
        problem = _probe(m, x, amp)
        if problem is None:
            runnable[op] = m
        else:
            batch_notes[op] = f"skipped: {problem}"
    candidates = {"static": static, **runnable}
    callables = {name: (_compiled(m) if compile else m) for name, m in candidates.items()}
    for m in candidates.values():
        m.eval()
    fwd = {name: _fwd_fn(callables[name], x, amp) for name in candidates}
    times_fwd = _measure(fwd, dev, repeats, max(warmup, 1) if compile else warmup, target_s)
    # an operator that cannot take a training step at this batch (ODConv's attention BatchNorm at batch 1)
    # keeps its inference timing; its training columns say why they are empty
    train_notes = {op: problem for op, m in runnable.items()
                   if (problem := _probe(m, x, amp, training=True)) is not None}
    trainable = {name: m for name, m in candidates.items() if name not in train_notes}
    for m in trainable.values():
        m.train()
    train = {name: _train_fn(callables[name], x, list(trainable[name].parameters()), amp) for name in trainable}
    times_train = _measure(train, dev, repeats, warmup, target_s)
    mem = {name: _train_memory(m, x, dev, amp) for name, m in trainable.items()}
    base_fwd, base_train = times_fwd["static"], times_train["static"]
    rows = []
    for op in ops:
        if op in batch_notes:
            rows.append(Row(shape_name, op, batch, note=batch_notes[op]))
            continue
        timed = op in trainable
        rows.append(Row(
            shape_name, op, batch,
            fwd_ratio=times_fwd[op] / base_fwd,
            train_ratio=times_train[op] / base_train if timed else None,
            mem_ratio=mem[op] / mem["static"] if timed and mem["static"] else None,
            static_fwd_ms=1e3 * base_fwd,
            static_train_ms=1e3 * base_train,
            train_img_s=batch / times_train[op] if timed else None,
            static_train_img_s=batch / base_train,
            paths=_auto_paths(modules[op], batch),
            train_note="" if timed else f"train skipped: {train_notes[op]}",
        ))
    for m in candidates.values():
        for p in m.parameters():
            p.grad = None
    return rows


def _probe(module: nn.Module, x: torch.Tensor, amp: str, training: bool = False) -> Optional[str]:
    """None when ``module`` runs on ``x`` (one inference forward, or with ``training`` one training-mode forward),
    else the one-line reason it cannot. Buffers (BatchNorm statistics) are restored after a training probe."""
    saved = {name: b.detach().clone() for name, b in module.named_buffers()} if training else {}
    module.train(training)
    try:
        with torch.set_grad_enabled(training), autocast_context(x.device, amp):
            module(x)
    except (ValueError, NotImplementedError) as exc:
        return str(exc).splitlines()[0]
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                if name in saved:
                    b.copy_(saved[name])
        module.eval()
    return None


def format_table(rows: Sequence[Row], memory_kind: str) -> str:
    width = max([18, *(len(r.op) for r in rows)])
    header = (f"{'shape':<20} {'batch':>5} {'operator':<{width}} {'fwd x':>7} {'train x':>8} {'mem x':>6} "
              f"{'img/s':>8}  static fwd/train ms  paths (auto)")
    lines = [header, "-" * len(header)]
    last = None
    for r in rows:
        key = (r.shape, r.batch)
        if last is not None and key != last:
            lines.append("")
        last = key
        if r.note:
            lines.append(f"{r.shape:<20} {r.batch:>5} {r.op:<{width}} {r.note}")
            continue
        mem = f"{r.mem_ratio:6.2f}" if r.mem_ratio is not None else f"{'-':>6}"
        static = f"{r.static_fwd_ms:.2f} / {r.static_train_ms:.2f}"
        img_s = f"{r.train_img_s:8.0f}" if r.train_img_s is not None else f"{'-':>8}"
        train = f"{r.train_ratio:8.2f}" if r.train_ratio is not None else f"{'-':>8}"
        lines.append(
            f"{r.shape:<20} {r.batch:>5} {r.op:<{width}} {r.fwd_ratio:7.2f} {train} {mem} {img_s}  "
            f"{static:<19}  {r.paths or r.train_note}".rstrip()
        )
    lines.append("")
    lines.append(f"ratios to nn.Conv2d in the same run (min over interleaved repeats); img/s = training throughput "
                 f"(batch / train time); mem = {memory_kind}")
    return "\n".join(lines)


def _csv_ints(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m image_classification.tools.benchmark",
        description="Time and memory of each dynamic operator as a ratio to nn.Conv2d.",
    )
    parser.add_argument("--ops", default=None,
                        help="comma-separated operator specs, e.g. pedconv,pedconv:path=patch_gemm,dcd (default: "
                        "every registered operator but static)")
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                        help=f"comma-separated layer shapes among: {', '.join(SHAPES)}")
    parser.add_argument("--batch-sizes", type=_csv_ints, default=[1, 32])
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--warmup", type=non_negative_int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                        help="cpu (default), cuda (CUDA-event timing) or auto (cuda when available)")
    parser.add_argument("--amp", default="none", choices=tuple(AMP_DTYPES),
                        help="run every module under torch.autocast with this dtype (default none)")
    parser.add_argument("--channels-last", action="store_true",
                        help="modules and inputs in the channels_last memory format")
    parser.add_argument("--all-paths", action="store_true",
                        help="also time pedconv:path=NAME for every registered PEDConv path but reference")
    parser.add_argument("--compile", action="store_true",
                        help="time torch.compile(fullgraph=True) of every module, nn.Conv2d included")
    parser.add_argument("--no-autotune", dest="autotune", action="store_false",
                        help="PEDConv path=auto uses its shape heuristic instead of timing the paths")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    parser.add_argument("--out-json", type=Path, default=None,
                        help="also write the JSON report to this file (atomically; its directory must exist)")
    args = parser.parse_args(argv)
    if args.out_json is not None and not args.out_json.parent.is_dir():
        parser.error(f"--out-json {args.out_json}: directory {args.out_json.parent} does not exist")
    available = [op for op in list_operators() if op != "static"]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] if args.ops else available
    if args.all_paths:
        ops += [f"pedconv:path={name}" for name in PATH_REGISTRY if name != "reference"
                and f"pedconv:path={name}" not in ops]
    unknown = [o for o in ops if o.split(":", 1)[0].strip().lower() not in list_operators()]
    if unknown or not ops:
        parser.error(f"unknown operator(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(available)}")
    for op in ops:
        try:
            parse_spec(op)
        except ValueError as exc:
            parser.error(f"--ops {op}: {exc}")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in SHAPES]
    if bad or not shapes:
        parser.error(f"unknown shape(s) {', '.join(bad) or '(none given)'}; valid: {', '.join(SHAPES)}")
    try:
        args.device = resolve_device(args.device).type
    except ValueError as exc:
        parser.error(str(exc))
    args.ops, args.shapes = ops, shapes
    return args


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.autotune:
        set_autotune(False)
    def log(msg: str) -> None:  # stderr: standard output keeps the table or the JSON
        print(msg, file=sys.stderr, flush=True)

    memory_kind = ("CUDA peak allocated during forward+backward" if args.device == "cuda"
                   else "bytes of non-parameter tensors saved for backward (training step)")

    def report_of(rows: List[Row], complete: bool) -> Dict[str, object]:
        return {"device": args.device, "device_name": _device_name(args.device), "threads": args.threads,
                "repeats": args.repeats, "compile": args.compile, "autotune": args.autotune,
                "amp": args.amp, "channels_last": args.channels_last,
                "torch": torch.__version__, "memory": memory_kind, "complete": complete,
                "rows": [asdict(r) for r in rows]}

    measured: List[Row] = []

    def progress(rows: List[Row]) -> None:
        measured[:] = rows
        if args.out_json is not None:
            write_json_atomic(args.out_json, report_of(rows, False))

    status = 0
    try:
        rows = run_benchmark(args.ops, args.shapes, args.batch_sizes, args.repeats, args.warmup, args.device, log,
                             compile=args.compile, amp=args.amp, channels_last=args.channels_last,
                             on_progress=progress)
    except KeyboardInterrupt:  # Ctrl-C: the rows measured so far, then exit 130
        rows, status = list(measured), 130
        log(f"benchmark: interrupted; the {len(rows)} row(s) measured so far follow"
            + (f" (also in {args.out_json}, marked incomplete)" if args.out_json is not None else ""))
    finally:
        if not args.autotune:
            set_autotune(None)
    report = report_of(rows, status == 0)
    if args.out_json is not None:
        write_json_atomic(args.out_json, report)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"device={args.device} ({_device_name(args.device)}) threads={args.threads} repeats={args.repeats} "
              f"compile={args.compile} autotune={args.autotune} amp={args.amp} channels_last={args.channels_last} "
              f"torch={torch.__version__}")
        print(format_table(rows, memory_kind))
    return status


if __name__ == "__main__":
    run_program(main)
