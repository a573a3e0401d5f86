"""Iteration-based training loop shared by the detection and segmentation scripts.

Detection (SSD: 160k + 40k + 40k iterations) and segmentation (ADE20K: epochs of 5000 iterations, poly decay)
schedules are counted in iterations, so this loop is too. It reuses the classification trainer's pieces:
main.py's optimizers and their flags (:func:`image_classification.training.optim.add_optimizer_flags`: SGD by
default, BatchNorm/bias excluded from weight decay), atomic checkpoints, safe loading and RNG capture
(:mod:`image_classification.training.checkpoint`), the DLLogger-format raport and the tqdm progress bar
(:mod:`image_classification.training.logger`), process-group setup (:mod:`image_classification.training.distributed`)
and PEDConv's info-max term
(:func:`image_classification.dynamic.base.infomax_loss`, weight ``--infomax-weight``).

A task supplies a :class:`Task`: its loss on a batch, its evaluation, and the metric that picks the best
checkpoint. Checkpoints (``checkpoint.pth.tar``, ``model_best.pth.tar`` when the metric improves) hold the
iteration, model, optimizer, scheduler, scaler, best metric, RNG states and arguments; ``--resume auto``
continues from the workspace checkpoint. SIGTERM/SIGINT finish the current iteration, write a checkpoint and
exit with 128 + signal. A non-finite loss stops the run with a one-line error (exit 3) and keeps the last
checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections.abc import Sized
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, cast

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

from image_classification.argparsing import non_negative_float, non_negative_int, positive_int
from image_classification.data import DataError
from image_classification.dynamic.base import infomax_loss
from image_classification.dynamic.registry import parse_spec
from image_classification.training.checkpoint import (
    CheckpointError,
    GracefulShutdown,
    add_trust_flag,
    check_workspace_writable,
    load_checkpoint,
    load_model_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
    trust_checkpoints,
)
from image_classification.training.config import load_config
from image_classification.training.distributed import (
    DistEnv,
    align_gradient_strides,
    all_reduce_sum,
    barrier,
    cleanup,
)
from image_classification.training.engine import NonFiniteLossError
from image_classification.training.exit_status import error_line, expected_failure, signal_status
from image_classification.training.logger import Progress, RaportWriter
from image_classification.training.optim import add_optimizer_flags, check_optimizer_flags, optimizer_from_args

__all__ = ["IterationSchedule", "Task", "TaskLoader", "add_common_flags", "check_common_flags", "train",
           "infinite_batches", "load_config_defaults", "parse_task_args", "run_cli", "split_parts"]


class IterationSchedule:
    """LR multiplier at iteration ``t`` (picklable, for LambdaLR): linear warmup over ``warmup`` iterations,
    then ``step`` (``decay ** #{milestones <= t}``, SSD) or ``poly`` (``(1 - t / total) ** power``, ADE20K)."""

    def __init__(self, policy: str, total: int, warmup: int = 0, milestones: Sequence[int] = (),
                 decay: float = 0.1, power: float = 0.9) -> None:
        if policy not in ("step", "poly"):
            raise ValueError(f"unknown lr schedule {policy!r}; valid: step, poly")
        self.policy, self.total, self.warmup = policy, int(total), int(warmup)
        self.milestones = sorted(int(m) for m in milestones)
        self.decay, self.power = float(decay), float(power)

    def __call__(self, step: int) -> float:
        scale = (step + 1) / self.warmup if step < self.warmup else 1.0
        if self.policy == "step":
            return scale * self.decay ** sum(1 for m in self.milestones if step >= m)
        return scale * max(0.0, 1.0 - step / max(1, self.total)) ** self.power


@dataclass
class Task:
    """What a dense task plugs into :func:`train`."""

    name: str  # "detection" | "segmentation"
    prog: str  # program name for messages
    losses: Callable[[nn.Module, Any, torch.device], Dict[str, torch.Tensor]]  # weighted loss terms of a batch
    evaluate: Callable[[nn.Module, Any, torch.device], Dict[str, float]]  # "val.*" metrics (rank 0)
    best_metric: str  # e.g. "val.AP", "val.mIoU" (higher is better)
    checkpoint_fields: Dict[str, Any]  # arch, conv, ... stored in checkpoints and checked on resume


def add_common_flags(parser: argparse.ArgumentParser, defaults: Dict[str, Any]) -> None:
    """Flags every dense training script has; ``defaults`` holds the task's values."""
    p = parser
    p.add_argument("data", metavar="DATA", nargs="?", default=None, help="dataset root (layout: see --help epilog)")
    p.add_argument("--config", metavar="FILE.yaml", help="recipe; keys are long flag names, flags given win")
    p.add_argument("--conv", default="static", help="operator spec of the backbone, e.g. static, pedconv, dcd")
    p.add_argument("--backbone", default="resnet50", help="ResNet trunk: resnet18, resnet34, resnet50, resnet101")
    p.add_argument("--trunk-placement", default=None,
                   help="which trunk convs become dynamic (placement string; default: the paper-count one)")
    p.add_argument("--dynamic-parts", default=None,
                   help="'+'-joined head/backbone parts made dynamic, 'none' or 'all' (default: the paper-count ones)")
    p.add_argument("--pretrained-backbone", default=None, metavar="PATH",
                   help="ImageNet checkpoint of this project (or a torchvision state dict) for the trunk")
    p.add_argument("-b", "--batch-size", type=positive_int, default=defaults["batch_size"], help="images per process")
    p.add_argument("--iterations", type=positive_int, default=defaults["iterations"], help="total training iterations")
    add_optimizer_flags(p, lr=defaults["lr"], weight_decay=defaults["weight_decay"])
    p.add_argument("--lr-schedule", default=defaults["lr_schedule"], choices=("step", "poly"))
    p.add_argument("--lr-steps", type=non_negative_int, nargs="*", default=defaults.get("lr_steps", []), metavar="IT",
                   help="iterations where the step schedule multiplies the lr by --lr-decay")
    p.add_argument("--lr-decay", type=float, default=0.1)
    p.add_argument("--lr-power", type=non_negative_float, default=0.9, help="poly schedule exponent")
    p.add_argument("--warmup-iters", type=non_negative_int, default=defaults.get("warmup_iters", 0))
    p.add_argument("--infomax-weight", type=non_negative_float, default=1e-3, help="weight of PEDConv's info-max loss")
    p.add_argument("-j", "--workers", type=non_negative_int, default=4, help="data loading processes")
    p.add_argument("--workspace", default=defaults["workspace"], help="checkpoints and raport go here")
    p.add_argument("--raport-file", default="raport.json", help="DLLogger JSON-lines file (relative: in workspace)")
    p.add_argument("--resume", default=None, metavar="PATH|auto", help="continue a run from its checkpoint")
    p.add_argument("--eval-every", type=non_negative_int, default=defaults["eval_every"],
                   help="validate every N iterations (and at the end); 0: only at the end")
    p.add_argument("--save-every", type=non_negative_int, default=defaults["save_every"],
                   help="checkpoint every N iterations")
    p.add_argument("--no-eval", action="store_true", help="never validate (train only)")
    p.add_argument("-p", "--print-freq", type=positive_int, default=20, help="log every N iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--amp", action="store_true", help="mixed precision (fp16 with loss scaling on CUDA, bf16 on CPU)")
    p.add_argument("--evaluate", action="store_true", help="only evaluate --weights (or the --resume checkpoint)")
    p.add_argument("--weights", default=None, metavar="PATH", help="model checkpoint to evaluate or start from")
    add_trust_flag(p)


def check_common_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse impossible values with ``parser.error`` (one line, exit 2)."""
    try:
        check_optimizer_flags(args)
    except ValueError as exc:
        parser.error(str(exc))
    if not 0 < args.lr_decay <= 1:
        parser.error(f"--lr-decay must be in (0, 1], got {args.lr_decay}")
    if args.evaluate and not (args.weights or args.resume):
        parser.error("--evaluate needs --weights PATH (or --resume PATH)")


def parse_task_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], data: str) -> argparse.Namespace:
    """Parse a dense training script's flags: ``--config`` values as defaults, the common checks, DATA required
    (``data`` says what it must be, e.g. "a COCO-layout directory"), ``--conv`` normalised through the operator
    registry and ``--dynamic-parts`` split into ``args.dynamic_parts_list``. The script then checks its own flags."""
    load_config_defaults(parser, argv)
    args = parser.parse_args(argv)
    check_common_flags(parser, args)
    trust_checkpoints(args.trust_checkpoints)  # --weights, --resume and the pretrained backbone alike
    if args.data is None:
        parser.error(f"DATA ({data}) is required")
    try:
        args.conv = str(parse_spec(args.conv))
    except ValueError as exc:
        parser.error(str(exc))
    args.dynamic_parts_list = split_parts(args.dynamic_parts)
    return args


def split_parts(text: Optional[str]) -> Optional[Sequence[str]]:
    """``--dynamic-parts``: None (the task's default), ``()`` for 'none', else the '+'-joined names."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    return tuple(p.strip() for p in text.split("+") if p.strip())


def load_config_defaults(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> None:
    """Install ``--config FILE.yaml`` values (its ``base:`` chain applied, read by main.py's recipe loader) as
    parser defaults; flags on the command line still win."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config(parser, known.config))


class TaskLoader:
    """DataLoader over ``dataset``: train sharded by rank and shuffled per epoch from ``seed`` (drop_last when
    the shard holds a full batch); val the whole set in order (rank 0 evaluates). Worker errors surface as
    one-line :class:`DataError`."""

    def __init__(self, dataset: Any, batch_size: int, train: bool, workers: int, env: DistEnv, seed: int,
                 collate: Optional[Callable] = None) -> None:
        from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

        if train:
            self.sampler: Any = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank,
                                                   shuffle=True, seed=seed, drop_last=False)
            drop_last = len(self.sampler) >= batch_size
        else:
            self.sampler = SequentialSampler(dataset)
            drop_last = False
        generator = torch.Generator().manual_seed(seed + 7 * env.rank)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 collate_fn=collate, drop_last=drop_last, generator=generator,
                                 pin_memory=env.device.type == "cuda")

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        from image_classification.data.imagefolder import reraise_one_line

        iterator = iter(self.loader)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except DataError as exc:
                raise reraise_one_line(exc) from None
            yield batch


def infinite_batches(loader: Iterable, start_epoch: int = 0) -> Iterator[Any]:
    """Batches of ``loader`` epoch after epoch (``set_epoch`` on its sampler before each)."""
    epoch = start_epoch
    while True:
        set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise DataError("the training set yields no batch (fewer images than --batch-size?)")
        epoch += 1


def _metric_meta(name: str) -> Dict[str, Any]:
    if name.endswith("_ips"):
        return {"unit": "images/s", "format": ":>.2f"}
    if name.endswith(".lr"):
        return {"unit": None, "format": ":>5.6f"}
    return {"unit": None, "format": ":>5.5f"}


def _amp_context(device: torch.device, enabled: bool):
    if not enabled:
        import contextlib

        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


@dataclass
class DenseRun:
    """What one dense training run works on (built by :func:`prepare_run`)."""

    args: argparse.Namespace
    task: Task
    model: nn.Module  # unwrapped
    wrapped: nn.Module  # what runs the forward (DDP or the model)
    env: DistEnv
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: Optional[torch.amp.GradScaler]
    raport: RaportWriter
    start: int = 0  # iterations done before this process
    best: float = -math.inf  # best value of task.best_metric so far
    shutdown: Optional[GracefulShutdown] = None  # while training: a second signal waits for a checkpoint being written


def load_start(args: argparse.Namespace, task: Task,
               model: nn.Module) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """The weights a run starts from, loaded into ``model``: the ``--resume`` checkpoint (``auto``: the
    workspace's, if any) or ``--weights``. Returns the resume checkpoint and its path (None, None otherwise)."""
    resume_path = args.resume
    if resume_path == "auto":
        resume_path = os.path.join(args.workspace, "checkpoint.pth.tar")
        resume_path = resume_path if os.path.isfile(resume_path) else None
    fields = task.checkpoint_fields
    arch, conv = fields.get("arch"), fields.get("conv")
    if resume_path:
        resume = load_checkpoint(resume_path)
        _check_fields(resume, task, resume_path)
        load_model_weights(model, resume, expected_arch=arch, expected_conv=conv)
        return resume, resume_path
    if args.weights:
        load_model_weights(model, args.weights, expected_arch=arch, expected_conv=conv)
    return None, None


def prepare_run(args: argparse.Namespace, task: Task, model: nn.Module, env: DistEnv,
                resume: Optional[Dict[str, Any]], resume_path: Optional[str]) -> DenseRun:
    """Optimizer, iteration LR schedule, grad scaler, DDP wrapper and raport, restored from ``resume``."""
    device = env.device
    wrapped = model
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel

        align_gradient_strides(model)
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = optimizer_from_args(model, args)
    schedule = IterationSchedule(args.lr_schedule, args.iterations, args.warmup_iters, args.lr_steps,
                                 args.lr_decay, args.lr_power)
    scheduler = LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None
    start, best = 0, -math.inf
    if resume is not None:
        try:
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            if scaler is not None and resume.get("scaler"):
                scaler.load_state_dict(resume["scaler"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"--resume {resume_path}: optimizer state does not fit this run: "
                                  f"{' '.join(str(exc).split())[:200]}") from None
        start = int(resume["iteration"])
        best = float(resume.get("best_metric", -math.inf))
        rngs = resume.get("rng_per_rank") or []
        if len(rngs) == env.world_size:
            set_rng_state(rngs[env.rank])
    raport = RaportWriter(None)
    if env.is_main:
        workspace = check_workspace_writable(args.workspace)
        path = args.raport_file if os.path.isabs(args.raport_file) else os.path.join(workspace, args.raport_file)
        raport = RaportWriter(path, append=resume is not None)
        raport.log_parameters(dict(vars(args), task=task.name, world_size=env.world_size, device=str(device),
                                   **task.checkpoint_fields))
    barrier()
    return DenseRun(args, task, model, wrapped, env, optimizer, scheduler, scaler, raport, start, best)


def save_state(run: DenseRun, iteration: int, is_best: bool) -> None:
    """The run's checkpoint (atomic; every rank's random state gathered to rank 0)."""
    own = rng_state()
    per_rank: List[Any] = [own]
    if run.env.distributed:
        import torch.distributed as dist

        per_rank = [None] * run.env.world_size
        dist.all_gather_object(per_rank, own)
    if run.env.is_main:
        state = {"task": run.task.name, **run.task.checkpoint_fields, "iteration": iteration,
                 "state_dict": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                 "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict() if run.scaler else None,
                 "best_metric": run.best, "rng_per_rank": per_rank, "args": dict(vars(run.args))}
        with run.shutdown.saving() if run.shutdown is not None else contextlib.nullcontext():
            save_checkpoint(state, run.args.workspace, "checkpoint.pth.tar", is_best=is_best)
    barrier()


def evaluate_and_track(run: DenseRun, val_loader: Optional[Iterable], iteration: int) -> bool:
    """Validate on rank 0 (unless ``--no-eval``), log the metrics; whether the best metric improved. Every rank
    returns the same answer: a best checkpoint is a collective (it gathers the ranks' random states)."""
    args, task = run.args, run.task
    metrics: Dict[str, float] = {}
    if run.env.is_main and not args.no_eval and val_loader is not None:
        metrics = task.evaluate(run.model, val_loader, run.env.device)
        run.raport.log((iteration,), metrics)
        print(f"{task.prog}: iteration {iteration} " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
              flush=True)
    flag = [1.0 if metrics.get(task.best_metric, -math.inf) > run.best else 0.0]
    improved = all_reduce_sum(flag, run.env.device)[0] > 0
    if improved and metrics:
        run.best = metrics[task.best_metric]
    return bool(improved)


def train_step(run: DenseRun, batch: Any, iteration: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Forward, loss (task terms plus the weighted info-max term), backward and one optimizer and LR-schedule
    step; a non-finite loss is a :class:`NonFiniteLossError` naming ``iteration`` and every term (exit status 3,
    as in main.py)."""
    args, device = run.args, run.env.device
    with _amp_context(device, args.amp):
        terms = run.task.losses(run.wrapped, batch, device)
        loss = cast(torch.Tensor, sum(terms.values()))  # every task returns at least one loss term
        extra = infomax_loss(run.model)
        if extra is not None and args.infomax_weight > 0:
            terms["infomax"] = args.infomax_weight * extra
            loss = loss + terms["infomax"]
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"loss is {loss.item()} at iteration {iteration + 1} "
                            f"({', '.join(f'{k} {v.item():.4g}' for k, v in terms.items())}); "
                            "lower --lr or check the data; the last checkpoint is kept")
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        loss.backward()
        run.optimizer.step()
    run.scheduler.step()
    return loss, terms


def train(
    args: argparse.Namespace,
    task: Task,
    model: nn.Module,
    train_loader: Optional[Iterable],
    val_loader: Optional[Iterable],
    env: DistEnv,
) -> int:
    """Run ``args.iterations`` iterations (or only evaluate); returns the exit status."""
    device = env.device
    model.to(device)
    resume, resume_path = load_start(args, task, model)
    if args.evaluate:
        metrics = task.evaluate(model, val_loader, device) if env.is_main else {}
        if env.is_main:
            print(f"{task.prog}: evaluation " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        return 0
    assert train_loader is not None
    run = prepare_run(args, task, model, env, resume, resume_path)
    raport = run.raport
    batches = infinite_batches(train_loader, start_epoch=run.start // max(1, _length(train_loader)))
    for name in ("train.loss", "train.lr", "train.total_ips"):
        raport.metadata(name, _metric_meta(name))
    progress = Progress(f"{task.name} train", args.iterations, args.print_freq, enabled=env.is_main)
    progress.skip_to(run.start)
    window: Dict[str, float] = {}
    seen, tic = 0, time.perf_counter()
    iteration = run.start
    model.train()
    with GracefulShutdown(program=task.prog) as shutdown:
        run.shutdown = shutdown
        while iteration < args.iterations:
            batch = next(batches)
            loss, terms = train_step(run, batch, iteration)
            iteration += 1
            seen += _batch_size(batch)
            for key, value in [("loss", loss), *terms.items()]:
                window[f"train.{key}"] = window.get(f"train.{key}", 0.0) + float(value.detach())
            if iteration % args.print_freq == 0 or iteration == args.iterations:
                count = args.print_freq if iteration % args.print_freq == 0 else iteration % args.print_freq
                record = {k: v / count for k, v in window.items()}
                record["train.lr"] = run.optimizer.param_groups[0]["lr"]
                record["train.total_ips"] = seen * env.world_size / max(1e-9, time.perf_counter() - tic)
                raport.log((iteration,), record)
                progress.update(iteration, {k: v for k, v in record.items() if k != "train.total_ips"})
                window, seen, tic = {}, 0, time.perf_counter()
            else:
                progress.tick(iteration)
            stop = shutdown.synchronized(device if device.type == "cuda" else None)
            boundary = iteration == args.iterations
            is_best = False
            if (args.eval_every and iteration % args.eval_every == 0) or boundary:
                model.eval()
                is_best = evaluate_and_track(run, val_loader, iteration)
                model.train()
            if boundary or stop or (args.save_every and iteration % args.save_every == 0) or is_best:
                save_state(run, iteration, is_best)
            if stop:
                progress.close()
                where = os.path.join(args.workspace, "checkpoint.pth.tar")
                if env.is_main:
                    print(f"{task.prog}: {shutdown.signal_name or 'signal'} received at iteration {iteration}; "
                          f"checkpoint saved to {where}; continue with --resume {where}", file=sys.stderr, flush=True)
                raport.close()
                return signal_status(shutdown.signum)
    progress.close()
    best = run.best
    summary: Dict[str, float] = {"summary.iterations": iteration}
    if best > -math.inf:
        summary[f"summary.best_{task.best_metric.split('.', 1)[-1]}"] = best
    raport.log((), summary)
    raport.close()
    if env.is_main:
        print(f"{task.prog}: finished {iteration}/{args.iterations} iterations"
              + (f", best {task.best_metric} {best:.4f}" if best > -math.inf else ""), flush=True)
    return 0


def _length(loader: Iterable) -> int:
    try:
        return len(loader) if isinstance(loader, Sized) else 1
    except TypeError:  # a DataLoader over an iterable dataset has __len__ but no length
        return 1


def _batch_size(batch: Any) -> int:
    images = batch[0]
    return len(images) if isinstance(images, (list, tuple)) else int(images.shape[0])


def _check_fields(checkpoint: Dict[str, Any], task: Task, path: str) -> None:
    if checkpoint.get("task") != task.name or "iteration" not in checkpoint:
        raise CheckpointError(f"--resume {path} is not a {task.name} training checkpoint of this project")
    for key, value in task.checkpoint_fields.items():
        if key in checkpoint and checkpoint[key] != value:
            raise CheckpointError(f"--resume {path} is for {key} {checkpoint[key]!r}, this run has {value!r}")


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run ``body`` with main.py's exit policy (:mod:`image_classification.training.exit_status`): bad input and an
    allocation the machine cannot serve are ``prog: error: <one line>`` with status 2, a diverged run status 3."""
    status: Optional[int] = None
    try:
        status = body()
        return status
    except Exception as exc:
        failure = expected_failure(exc)
        if failure is None:
            raise
        print(error_line(prog, failure.message), file=sys.stderr, flush=True)
        return failure.status
    finally:
        cleanup(all_ranks_here=status == 0)
