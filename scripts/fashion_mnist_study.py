#!/usr/bin/env python
"""Fashion-MNIST comparison of every operator on one small-image ResNet, same recipe and seeds.

Trains CIFAR ResNet-20 (configs/fashion_mnist/<op>.yaml: every conv but the stem replaced by the
operator) with ``python main.py`` once per (operator, seed), then measures each model's deploy
parameters, multiply-adds and batch-1 CPU inference latency against the static model (interleaved in
one process, :func:`image_classification.profiler.measure_latency`) and writes

* ``<out>/<name>.md``: test top-1 mean +- std over the seeds, parameters, MACs, training img/s,
  latency and its ratio to static, per-seed results and the exact command;
* ``<out>/<name>.csv``: the same numbers, one row per operator;
* ``<out>/<name>.png``: learning curves (training loss, test top-1 per epoch) and final accuracy.

Runs are resumable: a run whose raport is complete for the requested schedule is skipped, an
interrupted one continues from its checkpoint (``--resume auto``), a run made with other settings is
started again. Default settings take about an hour on 2 CPU cores (see docs/results/fashion_mnist.md
for the measured time).

Usage:
    python scripts/fashion_mnist_study.py                      # all operators, defaults below
    python scripts/fashion_mnist_study.py --ops static,pedconv --seeds 0 --epochs 1 --train-subset 2000
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from collect_results import epoch_metrics, parameters, read_records, summarize  # noqa: E402

CONFIG_DIR = ROOT / "configs" / "fashion_mnist"
DEFAULT_OPS = ("static", "pedconv", "pedconv_no_infomax", "dcd", "dyconv", "condconv", "involution", "odconv")
LABELS = {
    "static": "static conv",
    "pedconv": "PEDConv",
    "pedconv_no_infomax": "PEDConv, info-max off",
    "dcd": "DCD",
    "dyconv": "DY-Conv (K=4)",
    "condconv": "CondConv (K=8)",
    "involution": "Involution",
    "odconv": "ODConv (1 kernel)",
}
DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
DIVERGED_MARKER = "diverged.txt"
EXIT_DIVERGED = 3  # main.py's status for a run stopped by a NaN/inf loss


@dataclass
class RunResult:
    """One (operator, seed) training run, read back from its raport."""

    op: str
    seed: int
    top1: float  # test top-1 after the last epoch (%)
    best_top1: float
    train_ips: Optional[float]
    epoch_top1: Dict[int, float] = field(default_factory=dict)
    loss_curve: List[Tuple[float, float]] = field(default_factory=list)  # (fractional epoch, train.loss)
    seconds: Optional[float] = None
    diverged: bool = False  # a non-finite training or test loss was logged


@dataclass
class OpProfile:
    """Counts and CPU latency of one operator's model (latency fields None when not measured)."""

    conv: str
    params: int
    macs: int
    latency_ms: Optional[float] = None
    latency_ratio: Optional[float] = None
    train_step_ratio: Optional[float] = None


@dataclass
class OpSummary:
    op: str
    conv: str
    n: int
    top1_mean: float
    top1_std: Optional[float]
    params: int
    macs: int
    train_ips: Optional[float]
    latency_ms: Optional[float]
    latency_ratio: Optional[float]
    train_step_ratio: Optional[float]


# ----------------------------------------------------------------------------------------- runs
def config_path(op: str) -> Path:
    path = CONFIG_DIR / f"{op}.yaml"
    if not path.is_file() or op.startswith("_"):
        known = sorted(p.stem for p in CONFIG_DIR.glob("[!_]*.yaml"))
        raise SystemExit(f"error: unknown operator recipe {op!r}; known: {', '.join(known)}")
    return path


def read_recipe(op: str) -> Dict[str, Any]:
    """The op's recipe as main.py reads it (``base:`` applied): ``{dest: value}`` of the keys it sets."""
    from image_classification.training.cli import build_parser as main_parser
    from image_classification.training.cli import load_config

    return load_config(main_parser(), str(config_path(op)))


def run_dir(logs: Path, op: str, seed: int) -> Path:
    return logs / op / f"seed{seed}"


def _wanted(args: argparse.Namespace, op: str, seed: int) -> Dict[str, Any]:
    """The settings a finished run must have been made with to be reused (others are run again)."""
    return {"epochs": args.epochs, "seed": seed, "train_subset": args.train_subset, "val_subset": args.val_subset,
            "precise_bn": int(read_recipe(op).get("precise_bn", 0))}


def run_state(workspace: Path, wanted: Dict[str, Any]) -> str:
    """'done' (complete raport for ``wanted``), 'partial' (resumable), 'stale' (other settings) or 'new'."""
    raport = workspace / "raport.json"
    if not raport.is_file():
        return "new"
    try:
        params = parameters(read_records(raport))
        summary = summarize(raport)
    except (OSError, ValueError):
        return "stale"
    if any(params.get(key) != value for key, value in wanted.items()):
        return "stale"
    if (workspace / DIVERGED_MARKER).is_file():  # main.py stopped it (exit status 3): reported as diverged
        return "done"
    return "done" if summary.complete else "partial"


def train_command(args: argparse.Namespace, op: str, seed: int, workspace: Path, resume: bool) -> List[str]:
    cmd = [args.python, str(ROOT / "main.py"), args.data, "--config", str(config_path(op)), "--seed", str(seed),
           "--epochs", str(args.epochs), "--workspace", str(workspace), "--raport-file", "raport.json",
           "--print-freq", str(args.print_freq)]
    if args.train_subset:
        cmd += ["--train-subset", str(args.train_subset)]
    if args.val_subset:
        cmd += ["--val-subset", str(args.val_subset)]
    if resume:
        cmd += ["--resume", "auto"]
    return cmd + list(args.main_args)


def run_all(args: argparse.Namespace) -> None:
    """Train every missing (op, seed) run; completed ones are skipped."""
    for op in args.ops:
        for seed in args.seeds:
            workspace = run_dir(args.logs, op, seed)
            state = run_state(workspace, _wanted(args, op, seed))
            if state == "done":
                print(f"[study] {op} seed {seed}: complete in {workspace}, skipped", flush=True)
                continue
            if state == "stale" and workspace.exists():
                print(f"[study] {op} seed {seed}: {workspace} holds a run with other settings; starting again", flush=True)
                if not args.dry_run:
                    shutil.rmtree(workspace)
            resume = state == "partial"  # --resume auto: from the checkpoint, or again if none was written
            cmd = train_command(args, op, seed, workspace, resume)
            print(f"[study] {op} seed {seed}{' (resuming)' if resume else ''}: {shlex.join(cmd)}", flush=True)
            if args.dry_run:
                continue
            workspace.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            code = subprocess.call(cmd, cwd=ROOT)
            if code == EXIT_DIVERGED:
                print(f"[study] {op} seed {seed}: diverged (main.py stopped it on a NaN/inf loss); reported as "
                      "such", flush=True)
                (workspace / DIVERGED_MARKER).write_text("main.py exit status 3: non-finite loss\n")
            elif code != 0:
                raise SystemExit(f"error: training {op} seed {seed} failed with exit status {code} (see above)")
            (workspace / "seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")


def loss_curve(records: Sequence[Dict[str, Any]]) -> List[Tuple[float, float]]:
    """``(epoch + iteration / iterations_in_epoch, train.loss)`` of every per-iteration record."""
    points = []
    for record in records:
        step, data = record.get("step"), record.get("data", {})
        if isinstance(step, list) and len(step) == 2 and "train.loss" in data:
            points.append((int(step[0]), int(step[1]), float(data["train.loss"])))
    length: Dict[int, int] = {}
    for epoch, it, _ in points:
        length[epoch] = max(length.get(epoch, 0), it)
    return [(epoch + it / length[epoch], loss) for epoch, it, loss in points]


def load_run(workspace: Path, op: str, seed: int) -> RunResult:
    raport = workspace / "raport.json"
    records = read_records(raport)
    top1 = epoch_metrics(records, "val.top1")
    stopped = (workspace / DIVERGED_MARKER).is_file()
    if not top1 and not stopped:
        raise SystemExit(f"error: {raport} holds no val.top1 record (did the run fail?)")
    summary = summarize(raport)
    seconds_file = workspace / "seconds.txt"
    seconds = float(seconds_file.read_text()) if seconds_file.is_file() else None
    curve = loss_curve(records)
    losses = [record.get("data", {}).get(key) for record in records for key in ("train.loss", "val.loss")]
    # a run stopped before its first test has no accuracy: NaN, shown as "diverged", never a number
    return RunResult(op=op, seed=seed, top1=top1[max(top1)] if top1 else math.nan,
                     best_top1=max(top1.values()) if top1 else math.nan,
                     train_ips=summary.train_ips, epoch_top1=top1,
                     loss_curve=curve, seconds=seconds,
                     diverged=stopped or any(isinstance(loss, float) and not math.isfinite(loss) for loss in losses))


# ------------------------------------------------------------------------------------ profiling
def profile_op(op: str, latency: bool, threads: int, images: int) -> OpProfile:
    """Deploy params and MACs of the op's model at 28x28x1, 10 classes; batch-1 latency vs static."""
    from image_classification.dynamic import parse_spec
    from image_classification.profiler import measure_latency, profile_model

    recipe = read_recipe(op)
    arch, conv, placement = recipe["arch"], recipe["conv"], recipe.get("placement", "paper")
    size = int(recipe.get("image_size", 28))
    counts = profile_model(arch, conv, placement, size, num_classes=10, in_chans=1)
    prof = OpProfile(conv=conv, params=int(counts["params_deploy"]), macs=int(counts["macs"]))
    if latency:
        lat = measure_latency(arch, conv, placement, size, num_classes=10, in_chans=1, threads=threads,
                              images=images, warmup=max(5, images // 10), train_batch=32, train_steps=3,
                              train_warmup=1)
        if parse_spec(conv).is_static:  # the reference itself: ratios are 1 by definition
            prof.latency_ms, prof.latency_ratio, prof.train_step_ratio = lat["infer_ms_static"], 1.0, 1.0
        else:
            prof.latency_ms = lat["infer_ms_dynamic"]
            prof.latency_ratio = lat["infer_ratio"]
            prof.train_step_ratio = lat["train_ratio"]
    return prof


# -------------------------------------------------------------------------------------- results
def summarize_ops(results: Sequence[RunResult], profiles: Dict[str, OpProfile], ops: Sequence[str]) -> List[OpSummary]:
    """One row per operator (in ``ops`` order): mean and sample std of the final test top-1 over seeds."""
    rows = []
    for op in ops:
        runs = [r for r in results if r.op == op]
        if not runs:
            continue
        accs = [r.top1 for r in runs]
        ips = [r.train_ips for r in runs if r.train_ips is not None]
        prof = profiles[op]
        rows.append(OpSummary(
            op=op, conv=prof.conv, n=len(runs), top1_mean=statistics.fmean(accs),
            top1_std=statistics.stdev(accs) if len(accs) > 1 else None, params=prof.params, macs=prof.macs,
            train_ips=statistics.fmean(ips) if ips else None, latency_ms=prof.latency_ms,
            latency_ratio=prof.latency_ratio, train_step_ratio=prof.train_step_ratio,
        ))
    return rows


def _f(value: Optional[float], fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def results_table(rows: Sequence[OpSummary]) -> str:
    """The markdown results table (one row per operator)."""
    lines = [
        "| operator | spec | test top-1 (%) | seeds | params | MACs | train img/s | batch-1 latency (ms) "
        "| latency / static | train step / static |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        acc = f"{r.top1_mean:.2f}" + (f" ± {r.top1_std:.2f}" if r.top1_std is not None else "")
        if not math.isfinite(r.top1_mean):  # a seed was stopped before its first test
            acc = "diverged"
        lines.append(
            f"| {LABELS.get(r.op, r.op)} | `{r.conv}` | {acc} | {r.n} | {r.params / 1e6:.3f}M | {r.macs / 1e6:.1f}M "
            f"| {_f(r.train_ips, '.0f')} | {_f(r.latency_ms, '.2f')} | {_f(r.latency_ratio, '.2f')} "
            f"| {_f(r.train_step_ratio, '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def per_seed_table(results: Sequence[RunResult]) -> str:
    lines = ["| operator | seed | final test top-1 (%) | best test top-1 (%) | train img/s | wall time (s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        final = f"{r.top1:.2f}" if math.isfinite(r.top1) else "diverged"
        best = f"{r.best_top1:.2f}" if math.isfinite(r.best_top1) else "diverged"
        lines.append(f"| {LABELS.get(r.op, r.op)} | {r.seed} | {final} | {best} "
                     f"| {_f(r.train_ips, '.0f')} | {_f(r.seconds, '.0f')} |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[OpSummary], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["operator", "spec", "seeds", "top1_mean", "top1_std", "params", "macs", "train_ips",
                         "latency_ms", "latency_ratio", "train_step_ratio"])
        for r in rows:
            writer.writerow([r.op, r.conv, r.n, f"{r.top1_mean:.4f}", "" if r.top1_std is None else f"{r.top1_std:.4f}",
                             r.params, r.macs, "" if r.train_ips is None else f"{r.train_ips:.2f}",
                             "" if r.latency_ms is None else f"{r.latency_ms:.4f}",
                             "" if r.latency_ratio is None else f"{r.latency_ratio:.4f}",
                             "" if r.train_step_ratio is None else f"{r.train_step_ratio:.4f}"])


def plot_curves(results: Sequence[RunResult], rows: Sequence[OpSummary], path: Path, title: str) -> None:
    """PNG: training loss per logged iteration, test top-1 per epoch (mean over seeds), final top-1 bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [r.op for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {op: plt.get_cmap("tab10")(i % 10) for i, op in enumerate(ops)}
    for op in ops:
        runs = [r for r in results if r.op == op]
        length = min(len(r.loss_curve) for r in runs)
        if length:
            xs = [runs[0].loss_curve[i][0] for i in range(length)]
            mean_loss = [statistics.fmean(r.loss_curve[i][1] for r in runs) for i in range(length)]
            axes[0].plot(xs, mean_loss, marker="." if length < 30 else None, label=LABELS.get(op, op), color=colors[op])
        epochs = sorted(set.intersection(*(set(r.epoch_top1) for r in runs)))
        if epochs:
            mean_acc = [statistics.fmean(r.epoch_top1[e] for r in runs) for e in epochs]
            axes[1].plot([e + 1 for e in epochs], mean_acc, marker="o", label=LABELS.get(op, op), color=colors[op])
    axes[0].set(xlabel="epoch", ylabel="training loss (window mean)",
                title="training loss (mean over seeds)", yscale="log")
    axes[1].set(xlabel="epoch", ylabel="test top-1 (%)", title="test top-1 (mean over seeds)")
    axes[1].xaxis.get_major_locator().set_params(integer=True)
    means = [r.top1_mean if math.isfinite(r.top1_mean) else 0.0 for r in rows]  # diverged: no bar
    errs = [r.top1_std if r.top1_std is not None and math.isfinite(r.top1_std) else 0.0 for r in rows]
    axes[2].bar(range(len(rows)), means, yerr=errs, color=[colors[op] for op in ops], capsize=4)
    axes[2].set_xticks(range(len(rows)), [LABELS.get(op, op) for op in ops], rotation=30, ha="right")
    shown = [(m, e) for m, e in zip(means, errs) if m > 0]
    low = min(m - e for m, e in shown) if shown else 0.0
    axes[2].set_ylim(max(0.0, low - 2.0), min(100.0, max(m + e for m, e in shown) + 1.0) if shown else 100)
    axes[2].set(ylabel="final test top-1 (%)", title="final test top-1 (± std over seeds)")
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment_line(threads: int) -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"{threads} thread(s) for the latency measurement")


def write_report(
    results: Sequence[RunResult],
    profiles: Dict[str, OpProfile],
    ops: Sequence[str],
    out: Path,
    name: str,
    command: str,
    settings: str,
    environment: str,
    total_seconds: Optional[float] = None,
    plot: bool = True,
) -> List[OpSummary]:
    """Write ``<out>/<name>.md`` (+ ``.csv`` and ``.png``) from run results; returns the summary rows."""
    rows = summarize_ops(results, profiles, ops)
    if not rows:
        raise SystemExit("error: no finished runs to report")
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / f"{name}.csv")
    if plot:
        plot_curves(results, rows, out / f"{name}.png", f"Fashion-MNIST, CIFAR ResNet-20: {settings}")
    static = next((r for r in rows if r.op == "static"), None)
    best = max(rows, key=lambda r: r.top1_mean if math.isfinite(r.top1_mean) else -math.inf)
    lines = [
        "# Fashion-MNIST: PEDConv against static convolution and its peers",
        "",
        "CIFAR ResNet-20 (16/32/64 channels) on 28x28 grey Fashion-MNIST images; every convolution except the",
        "stem is replaced by the operator (placement `paper`); the same recipe (configs/fashion_mnist/*.yaml:",
        "SGD Nesterov 0.9, batch 128, lr 0.1 cosine, wd 5e-4) and the same seeds for every operator.",
        f"Settings: {settings}. Test top-1 is measured on the Fashion-MNIST test set after the last epoch;",
        "± is the sample standard deviation over the seeds. Parameters are deploy parameters (PEDConv's",
        "training-only info-max decoder excluded); MACs per image at 28x28. Train img/s: main.py's epoch",
        "throughput. Latency: median batch-1 CPU inference, measured interleaved with the static model in one",
        "process (`image_classification.profiler.measure_latency`), so the ratios are the comparable figures.",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {environment}." + (f" Wall time: {total_seconds / 60:.1f} min (training runs + profiling)." if total_seconds else ""),
        "",
        "## Results",
        "",
        results_table(rows),
        f"Highest mean test top-1: {LABELS.get(best.op, best.op)} ({best.top1_mean:.2f}%)"
        + (f"; static conv: {static.top1_mean:.2f}%." if static and static is not best else "."),
        "",
        f"![learning curves]({name}.png)",
        "",
        "## Per run",
        "",
        per_seed_table(results),
        "## What this does and does not say",
        "",
        "- It compares the operators on real data under one controlled recipe, on a CPU budget: a short",
        "  schedule on small 28x28 images with a 0.27M-parameter network. Differences smaller than about two",
        "  standard deviations over the seeds are not evidence either way.",
        "- It says nothing direct about the ImageNet claims (PEDConv Table 1: +3.8 points on ResNet-18 over",
        "  static conv at 120 epochs): the dynamic generators condition on global context that 28x28",
        "  Fashion-MNIST items carry little of, and the schedule is far shorter than the papers'.",
        *([
            "- DY-Conv anneals its softmax temperature from 30 to 1 over 10 epochs (Chen et al.); in a shorter",
            "  schedule it is trained and evaluated at a temperature above 1.",
        ] if "dyconv" in ops else []),
        *([
            "- Runs that diverged under this recipe (a non-finite training or test loss: main.py stops such a run,",
            "  exit status 3; lr 0.1 with no warmup): "
            + ", ".join(f"{LABELS.get(r.op, r.op)} seed {r.seed}" for r in results if r.diverged)
            + ". Their top-1 is the last test before they stopped (\"diverged\" when there was none).",
        ] if any(r.diverged for r in results) else []),
        "- Parameter and MAC counts are exact; the latency ratios are measurements on this machine's CPU.",
        "",
    ]
    (out / f"{name}.md").write_text("\n".join(lines), encoding="utf-8")
    return rows


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"Fashion-MNIST IDX .gz directory (default {DEFAULT_DATA})")
    parser.add_argument("--ops", default=",".join(DEFAULT_OPS),
                        help=f"comma-separated recipes of configs/fashion_mnist/ (default: {','.join(DEFAULT_OPS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (default: 0 1)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default: 2)")
    parser.add_argument("--train-subset", type=int, default=5000,
                        help="train on a seeded random subset of N of the 60000 images; 0 = all (default: 5000)")
    parser.add_argument("--val-subset", type=int, default=0,
                        help="test on a seeded random subset of N of the 10000 test images; 0 = all (default: 0)")
    parser.add_argument("--print-freq", type=int, default=5, help="log the training loss every N iterations (default: 5)")
    parser.add_argument("--logs", type=Path, default=ROOT / "logs" / "fashion_mnist_study",
                        help="run workspaces: LOGS/<op>/seed<k>/ (default: logs/fashion_mnist_study)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results",
                        help="where <name>.md/.csv/.png go (default: docs/results)")
    parser.add_argument("--name", default="fashion_mnist", help="base name of the result files (default: fashion_mnist)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the latency measurement (default: 2)")
    parser.add_argument("--latency-images", type=int, default=200,
                        help="timed batch-1 inferences per model (default: 200)")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs main.py (default: this one)")
    parser.add_argument("--dry-run", action="store_true", help="print the training commands and stop")
    parser.add_argument("main_args", nargs=argparse.REMAINDER,
                        help="after --: extra main.py flags for every run (e.g. -- --device cpu)")
    return parser


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.main_args and args.main_args[0] == "--":
        args.main_args = args.main_args[1:]
    args.ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    if not args.ops:
        parser.error("--ops is empty")
    for op in args.ops:
        if op.startswith("_") or not (CONFIG_DIR / f"{op}.yaml").is_file():
            parser.error(f"unknown op {op!r}; choose from {', '.join(sorted(p.stem for p in CONFIG_DIR.glob('[!_]*.yaml')))}")
    for name in ("epochs", "print_freq", "threads", "latency_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("train_subset", "val_subset"):
        value = getattr(args, name)
        if value < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
        setattr(args, name, value or None)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds must be distinct")
    if not args.dry_run and not Path(args.data).is_dir():
        parser.error(f"--data {args.data}: no such directory (install Debian's dataset-fashion-mnist, or pass --data)")
    return args


def settings_text(args: argparse.Namespace) -> str:
    train = f"{args.train_subset} of 60000 training images" if args.train_subset else "all 60000 training images"
    test = f"{args.val_subset} of 10000 test images" if args.val_subset else "all 10000 test images"
    seeds = " ".join(map(str, args.seeds))
    return f"{args.epochs} epoch(s) on {train}, {test}, seeds {seeds}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    command = "python scripts/fashion_mnist_study.py " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
    run_all(args)
    if args.dry_run:
        return 0
    results = [load_run(run_dir(args.logs, op, seed), op, seed) for op in args.ops for seed in args.seeds]
    profiles = {}
    profiling_start = time.perf_counter()
    for op in args.ops:
        print(f"[study] profiling {op} (params, MACs{'' if args.no_latency else ', batch-1 latency vs static'})",
              flush=True)
        profiles[op] = profile_op(op, not args.no_latency, args.threads, args.latency_images)
    total = sum(r.seconds or 0.0 for r in results) + time.perf_counter() - profiling_start
    rows = write_report(results, profiles, args.ops, args.out, args.name, command.strip(), settings_text(args),
                        environment_line(args.threads), total_seconds=total)
    sys.stdout.write("\n" + results_table(rows) + "\n")
    print(f"[study] wrote {args.out / (args.name + '.md')}, .csv and .png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
