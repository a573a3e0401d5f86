#!/usr/bin/env python
"""Fashion-MNIST comparison of every operator on one small-image ResNet, same recipe and seeds.

Trains CIFAR ResNet-20 (configs/fashion_mnist/<op>.yaml: every conv but the stem replaced by the
operator) with ``python main.py`` once per (operator, seed), then measures each model's deploy
parameters, multiply-adds and batch-1 CPU inference latency against the static model (interleaved in
one process, :func:`image_classification.measurement.latency.measure_latency`) and writes

* ``<out>/<name>.md``: test top-1 mean +- std over the seeds, parameters, MACs, training img/s,
  latency and its ratio to static, per-seed results and the exact command;
* ``<out>/<name>.csv``: the same numbers, one row per operator;
* ``<out>/<name>.png``: learning curves (training loss, test top-1 per epoch) and final accuracy.

Runs are resumable: a run whose raport is complete for the requested schedule is skipped, an
interrupted one continues from its checkpoint (``--resume auto``); each schedule (epochs, training and test
subsets) has its own folder under ``--logs``, so a study with other settings never replaces finished runs,
and results go next to them unless ``--out`` says otherwise (the committed ``docs/results`` files were written
with ``--out docs/results``). Ctrl-C (or SIGTERM) asks the running ``main.py`` to save its checkpoint and
waits for it; rerunning the same command continues. Default settings take about an hour on 2 CPU cores
(see docs/results/fashion_mnist.md for the measured time).

Usage:
    python scripts/fashion_mnist_study.py                      # all operators, defaults below
    python scripts/fashion_mnist_study.py --ops static,pedconv --seeds 0 --epochs 1 --train-subset 2000
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from image_classification.argparsing import ArgumentParser, non_negative_int, positive_int  # noqa: E402
from image_classification.reporting.fashion_mnist_study import (  # noqa: E402
    DIVERGED_MARKER,
    LABELS,
    ImageNetCost,
    OpProfile,
    OpSummary,
    RunResult,
    console_summary,
    environment_line,
    load_run,
    per_seed_table,
    plot_curves,
    results_table,
    summarize_ops,
    write_csv,
    write_report,
)
from image_classification.reporting.raport import loss_curve, parameters, read_raport  # noqa: E402
from image_classification.reporting.run_summary import summarize  # noqa: E402

__all__ = [  # the reporting names are re-exported for callers of this script's module
    "DIVERGED_MARKER", "LABELS", "OpProfile", "OpSummary", "RunResult", "environment_line", "load_run",
    "loss_curve", "main", "per_seed_table", "plot_curves", "results_table", "run_all", "summarize_ops",
    "write_csv", "write_report",
]

CONFIG_DIR = ROOT / "configs" / "fashion_mnist"
DEFAULT_OPS = ("static", "pedconv", "pedconv_no_infomax", "dcd", "dyconv", "condconv", "involution", "odconv")
DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
_LOG = logging.getLogger("fashion_mnist_study")
EXIT_DIVERGED = 3  # main.py's status for a run stopped by a NaN/inf loss


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
    from image_classification.training.config import load_config

    return load_config(main_parser(), str(config_path(op)))


def settings_tag(args: argparse.Namespace) -> str:
    """The folder of one schedule's runs under --logs: runs made with other settings live beside them, never over
    them (``e2-train5000-testall``)."""
    return (f"e{args.epochs}-train{args.train_subset or 'all'}-test{args.val_subset or 'all'}")


def run_dir(logs: Path, op: str, seed: int, tag: str = "") -> Path:
    return (logs / tag if tag else logs) / op / f"seed{seed}"


def _set_aside(workspace: Path) -> Path:
    """Rename a run made with other settings (a recipe edited since) to ``<name>.old-N``; nothing is deleted."""
    n = 1
    while (aside := workspace.with_name(f"{workspace.name}.old-{n}")).exists():
        n += 1
    workspace.rename(aside)
    return aside


class StudyInterrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM during a training run: main.py was told, saved its checkpoint and exited."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def run_main(cmd: List[str]) -> int:
    """main.py as a child in a session of its own, so that a terminal's Ctrl-C reaches only this script, which then
    forwards exactly one SIGINT and waits for main.py's checkpoint (a second signal would cut the save short).
    SIGTERM is forwarded the same way. Raises :class:`StudyInterrupted` after such a stop."""
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    received: List[int] = []

    def forward(signum: int, _frame: Any) -> None:
        if not received:
            received.append(signum)
            print(f"\n[study] {signal.Signals(signum).name}: asking main.py to save its checkpoint, then stopping "
                  "(rerun the same command to continue)", file=sys.stderr, flush=True)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise StudyInterrupted(128 + received[0])
    return code


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
        params = parameters(read_raport(raport))
        summary = summarize(raport)
    except (OSError, ValueError) as exc:
        _LOG.warning("%s cannot be read (%s): the run is started again", raport, exc)
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
            workspace = run_dir(args.logs, op, seed, settings_tag(args))
            state = run_state(workspace, _wanted(args, op, seed))
            if state == "done":
                print(f"[study] {op} seed {seed}: complete in {workspace}, skipped", flush=True)
                continue
            if state == "stale" and workspace.exists():
                if args.dry_run:
                    print(f"[study] {op} seed {seed}: {workspace} holds a run with other settings; it would be "
                          "renamed and the run started again", flush=True)
                else:
                    aside = _set_aside(workspace)
                    print(f"[study] {op} seed {seed}: {workspace} held a run with other settings (kept as {aside}); "
                          "starting again", flush=True)
            resume = state == "partial"  # --resume auto: from the checkpoint, or again if none was written
            cmd = train_command(args, op, seed, workspace, resume)
            print(f"[study] {op} seed {seed}{' (resuming)' if resume else ''}: {shlex.join(cmd)}", flush=True)
            if args.dry_run:
                continue
            workspace.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            code = run_main(cmd)
            if code == EXIT_DIVERGED:
                print(f"[study] {op} seed {seed}: diverged (main.py stopped it on a NaN/inf loss); reported as "
                      "such", flush=True)
                (workspace / DIVERGED_MARKER).write_text("main.py exit status 3: non-finite loss\n")
            elif code != 0:
                raise SystemExit(f"error: training {op} seed {seed} failed with exit status {code} (see above)")
            (workspace / "seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")


# ------------------------------------------------------------------------------------ profiling
def profile_op(op: str, latency: bool, threads: int, images: int) -> OpProfile:
    """Deploy params and MACs of the op's model at 28x28x1, 10 classes; batch-1 latency vs static."""
    from image_classification.dynamic import parse_spec
    from image_classification.measurement.latency import measure_latency
    from image_classification.measurement.paper_tables import profile_model

    recipe = read_recipe(op)
    from image_classification.dynamic.registry import operator_class

    arch, conv = recipe["arch"], recipe["conv"]
    placement = recipe.get("placement") or operator_class(conv).default_placement  # what main.py trains
    size = int(recipe.get("image_size", 28))
    counts = profile_model(arch, conv, placement, size, num_classes=10, in_chans=1)
    prof = OpProfile(conv=conv, params=int(counts["params_deploy"]), macs=int(counts["macs"]))
    if latency:
        lat = measure_latency(arch, conv, placement=placement, image_size=size, num_classes=10, in_chans=1,
                              threads=threads,
                              images=images, warmup=max(5, images // 10), train_batch=32, train_steps=3,
                              train_warmup=1)
        if parse_spec(conv).is_static:  # the reference itself: ratios are 1 by definition
            prof.latency_ms, prof.latency_ratio, prof.train_step_ratio = lat["infer_ms_static"], 1.0, 1.0
        else:
            prof.latency_ms = lat["infer_ms_dynamic"]
            prof.latency_ratio = lat["infer_ratio"]
            prof.train_step_ratio = lat["train_ratio"]
    return prof


IMAGENET_TRAIN_BATCH = 16


def imagenet_cost(arch: str, threads: int) -> ImageNetCost:
    """PEDConv / static on ``arch`` at 224 px: batch-1 latency (40 images) and a training step (batch 16),
    interleaved in this process; about 40 s for ResNet-18 on 2 CPU cores (less with the path cache)."""
    from image_classification.measurement.latency import measure_latency

    print(f"[study] measuring PEDConv / static on {arch} at 224 px (batch-1 latency, train step; under a "
          "minute per network)", flush=True)
    lat = measure_latency(arch, "pedconv", threads=threads, images=40, warmup=5, train_batch=IMAGENET_TRAIN_BATCH,
                          train_steps=3, train_warmup=1)
    return ImageNetCost(arch, float(lat["infer_ratio"]), float(lat["train_ratio"]), IMAGENET_TRAIN_BATCH)


# -------------------------------------------------------------------------------------- results
# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help=f"Fashion-MNIST IDX .gz directory (default {DEFAULT_DATA})")
    parser.add_argument("--ops", default=",".join(DEFAULT_OPS),
                        help=f"comma-separated recipes of configs/fashion_mnist/ (default: {','.join(DEFAULT_OPS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (default: 0 1)")
    parser.add_argument("--epochs", type=positive_int, default=2, help="epochs per run (default: 2)")
    parser.add_argument("--train-subset", type=non_negative_int, default=5000,
                        help="train on a seeded random subset of N of the 60000 images; 0 = all (default: 5000)")
    parser.add_argument("--val-subset", type=non_negative_int, default=0,
                        help="test on a seeded random subset of N of the 10000 test images; 0 = all (default: 0)")
    parser.add_argument("--print-freq", type=positive_int, default=5,
                        help="log the training loss every N iterations (default: 5)")
    parser.add_argument("--logs", type=Path, default=ROOT / "logs" / "fashion_mnist_study",
                        help="run workspaces: LOGS/<settings>/<op>/seed<k>/, one <settings> folder per schedule "
                        "(e.g. e2-train5000-testall), so no run replaces another (default: logs/fashion_mnist_study)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where <name>.md/.csv/.png go (default: LOGS/<settings>/; the committed results were "
                        "written with --out docs/results)")
    parser.add_argument("--name", default="fashion_mnist",
                        help="base name of the result files (default: fashion_mnist)")
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="torch threads of the latency measurement (default: 2)")
    parser.add_argument("--latency-images", type=positive_int, default=200,
                        help="timed batch-1 inferences per model (default: 200)")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    parser.add_argument("--imagenet-cost", default="", metavar="ARCHS",
                        help="comma-separated ImageNet networks (resnet18, resnet50, mobilenet_v2, ...) on which to "
                        "also measure PEDConv's batch-1 latency and train step against static at 224 px, where the "
                        "paper makes its cost claim (the quick start: resnet18; default: none)")
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
    # "none" is what the help names as the default: no ImageNet network
    args.imagenet_cost = [a.strip() for a in args.imagenet_cost.split(",") if a.strip() and a.strip() != "none"]
    from image_classification.models import list_archs

    for arch in args.imagenet_cost:
        if arch not in list_archs():
            parser.error(f"--imagenet-cost: unknown arch {arch!r}; valid: {', '.join(list_archs())}")
    if not args.ops:
        parser.error("--ops is empty")
    for op in args.ops:
        if op.startswith("_") or not (CONFIG_DIR / f"{op}.yaml").is_file():
            known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("[!_]*.yaml")))
            parser.error(f"unknown op {op!r}; choose from {known}")
    for name in ("train_subset", "val_subset"):
        setattr(args, name, getattr(args, name) or None)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds must be distinct")
    from image_classification.training.cli import MAX_SEED

    if any(not 0 <= seed <= MAX_SEED for seed in args.seeds):  # what main.py --seed takes
        parser.error(f"--seeds must lie in [0, {MAX_SEED}], got {' '.join(map(str, args.seeds))}")
    if args.out is None:
        args.out = args.logs / settings_tag(args)
    if not args.dry_run and not Path(args.data).is_dir():
        parser.error(f"--data {args.data}: no such directory (install Debian's dataset-fashion-mnist, or pass --data)")
    return args


def settings_text(args: argparse.Namespace) -> str:
    train = f"{args.train_subset} of 60000 training images" if args.train_subset else "all 60000 training images"
    test = f"{args.val_subset} of 10000 test images" if args.val_subset else "all 10000 test images"
    seeds = " ".join(map(str, args.seeds))
    return f"{args.epochs} epoch(s) on {train}, {test}, seeds {seeds}"


def _error(exc: Exception) -> int:
    """The reporting package's ValueError as the script's one-line error; exit status 2."""
    print(f"error: {exc}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    command = "python scripts/fashion_mnist_study.py " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
    try:
        run_all(args)
    except StudyInterrupted as stop:
        print("[study] stopped; finished runs and the interrupted run's checkpoint are kept: rerun the same command to "
              "continue", file=sys.stderr, flush=True)
        return stop.status
    if args.dry_run:
        return 0
    tag = settings_tag(args)
    try:
        results = [load_run(run_dir(args.logs, op, seed, tag), op, seed) for op in args.ops for seed in args.seeds]
    except ValueError as exc:  # a run without results, an unreadable raport: one line, status 2
        return _error(exc)
    profiles = {}
    profiling_start = time.perf_counter()
    for op in args.ops:
        print(f"[study] profiling {op} (params, MACs{'' if args.no_latency else ', batch-1 latency vs static'})",
              flush=True)
        profiles[op] = profile_op(op, not args.no_latency, args.threads, args.latency_images)
    costs = [imagenet_cost(arch, args.threads) for arch in args.imagenet_cost]
    total = sum(r.seconds or 0.0 for r in results) + time.perf_counter() - profiling_start
    try:
        rows = write_report(results, profiles, args.ops, args.out, args.name, command.strip(), settings_text(args),
                            environment_line(args.threads), total_seconds=total, costs=costs)
    except ValueError as exc:  # no finished run to report
        return _error(exc)
    sys.stdout.write("\n" + results_table(rows) + "\n" + console_summary(rows, costs, settings_text(args)) + "\n")
    print(f"[study] wrote {args.out / (args.name + '.md')}, .csv and .png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
