"""``main.py``: train or evaluate, in one process or under torchrun, and never lose a run.

Order of work: parse and validate the command line, read the checkpoints and the data, build the model --
all of which only read the disk, so a bad input ends with ``main.py: error: <one line>`` (status 2) and
nothing written -- then create the workspace, open the raport and run.

Checkpoints hold ``epoch`` = completed epochs (plus ``step_in_epoch`` when a signal stopped an epoch
part-way); resuming restores weights, optimizer, scheduler, scaler, EMA, best top-1 and every RNG, and
the data order is a function of (seed, epoch), so an interrupted-and-resumed run equals an uninterrupted
one bit for bit on CPU with a fixed seed. SIGTERM/SIGINT: the current optimizer step finishes, a
checkpoint is written, and the process exits with 128 + signal number (143 for SIGTERM, 130 for SIGINT),
so that job schedulers see the run as interrupted rather than finished.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

from image_classification.data import DataError
from image_classification.dynamic import autotune, set_epoch

from . import build
from .checkpoint import (
    CheckpointError,
    GracefulShutdown,
    check_workspace_writable,
    rng_state,
    save_checkpoint,
)
from .checkpoint import set_rng_state as restore_rng
from .cli import parse_args
from .distributed import DistEnv, barrier, cleanup, init_distributed, sync_buffers
from .engine import Components, LoopConfig, train_one_epoch, validate
from .logger import RaportWriter

__all__ = ["main", "run"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``main.py``; returns the process exit status."""
    args = parse_args(argv)
    try:
        return run(args)
    except (DataError, CheckpointError, UsageError) as exc:
        print(f"main.py: error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        cleanup()


@dataclass
class _Run:
    """The objects of one invocation, built by :func:`_prepare`."""

    args: argparse.Namespace
    env: DistEnv
    loaders: Any
    comp: Components
    cfg: LoopConfig
    state: build.RunState
    conv: str
    resume_rng: Optional[Dict[str, Any]] = None
    resumed: bool = False
    raport: RaportWriter = field(default_factory=lambda: RaportWriter(None))
    last: Dict[str, float] = field(default_factory=dict)
    paths_printed: bool = False


class UsageError(ValueError):
    """A bad combination of options found while building the run (one-line message, exit status 2)."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(" ".join(str(exc).split()))


def _prepare(args: argparse.Namespace, env: DistEnv) -> _Run:
    resume_path, resume = build.resolve_resume(args)
    if args.seed is None and resume is not None:  # same data order and streams as the interrupted run
        args.seed = (resume.get("args") or {}).get("seed")
    build.seed_everything(args, env)
    pretrained = None
    if args.pretrained_weights is not None and resume is None:
        from .checkpoint import load_checkpoint

        pretrained = load_checkpoint(args.pretrained_weights)
    conv = build.infer_conv(args, resume or pretrained)
    loaders = build.build_data(args, env)
    try:
        model = build.build_network(args, conv, loaders, env)
    except ValueError as exc:
        raise UsageError(exc) from None
    for checkpoint, path in ((resume, resume_path), (pretrained, args.pretrained_weights)):
        if checkpoint is not None:
            build.load_weights(model, checkpoint, args, conv, path)
    cfg = build.loop_config(args, env)
    try:
        comp = build.build_components(args, model, loaders, env, cfg)
    except ValueError as exc:
        raise UsageError(exc) from None
    if pretrained is not None and comp.ema is not None and pretrained.get("ema") is not None:
        comp.ema.load_state_dict(pretrained["ema"])
    state = build.RunState()
    resume_rng = None
    if resume is not None:
        state = build.restore_training_state(comp, resume, env)
        resume_rng = _rank_rng(resume, env)
    return _Run(args, env, loaders, comp, cfg, state, conv, resume_rng, resumed=resume is not None)


def _rank_rng(checkpoint: Dict[str, Any], env: DistEnv) -> Optional[Dict[str, Any]]:
    per_rank = checkpoint.get("rng_per_rank")
    if isinstance(per_rank, (list, tuple)) and len(per_rank) == env.world_size:
        return per_rank[env.rank]
    return checkpoint.get("rng") if env.world_size == 1 else None


def _open_raport(run: _Run) -> None:
    args, env = run.args, run.env
    path = None
    if env.is_main:
        workspace = check_workspace_writable(args.workspace)
        path = args.raport_file if os.path.isabs(args.raport_file) else os.path.join(workspace, args.raport_file)
    barrier()
    run.raport = RaportWriter(path, append=run.resumed)
    params = dict(vars(args), conv=run.conv, world_size=env.world_size, device=str(env.device))
    run.raport.log_parameters(params)
    run.raport.log_metadata()


def run(args: argparse.Namespace) -> int:
    """Train or evaluate as ``args`` say; returns the exit status."""
    if args.local_rank is not None:  # torch.distributed.launch passes --local-rank instead of the variable
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    env = init_distributed(args.device)
    run_ = _prepare(args, env)
    _open_raport(run_)
    try:
        if args.evaluate:
            return _evaluate(run_)
        return _train(run_)
    finally:
        run_.raport.close()


def _sync_models(run: _Run) -> None:
    """Rank 0's BatchNorm statistics everywhere (model and EMA) before validating or saving."""
    sync_buffers(run.comp.module)
    if run.comp.ema is not None:
        sync_buffers(run.comp.ema.module)
    autotune.broadcast_cache()  # PEDConv paths tuned since the last sync: rank 0's choice everywhere


def _print_paths(run: _Run) -> None:
    """``--print-paths``: the path of every PEDConv layer per input shape, once per invocation."""
    if not getattr(run.args, "print_paths", False) or run.paths_printed or not run.env.is_main:
        return
    from image_classification.dynamic.pedconv import format_path_report, path_report

    print("PEDConv execution paths (path=auto: tuned or heuristic per input shape):\n"
          + format_path_report(path_report(run.comp.module)), flush=True)
    run.paths_printed = True


def _validate_all(run: _Run, epoch: int) -> Dict[str, float]:
    comp, cfg = run.comp, run.cfg
    # the unwrapped model: shards differ in batch count, so no per-batch collective (DDP's buffer broadcast)
    metrics = validate(comp.module, cfg, run.loaders.val, comp.criterion, "val", epoch)
    if comp.ema is not None:
        metrics.update(validate(comp.ema.module, cfg, run.loaders.val, comp.criterion, "val_ema", epoch))
    return metrics


def _evaluate(run: _Run) -> int:
    metrics = _validate_all(run, run.state.epoch)
    run.raport.log((run.state.epoch,), metrics)
    run.raport.log((), metrics)
    _print_paths(run)
    if run.env.is_main:
        print(f"evaluation: top1 {metrics['val.top1']:.3f}  top5 {metrics['val.top5']:.3f}  "
              f"loss {metrics['val.loss']:.4f}  ({int(metrics['val.samples'])} images)", flush=True)
    return 0


def _checkpoint_state(run: _Run, epoch: int, step_in_epoch: int) -> Dict[str, Any]:
    comp, args = run.comp, run.args
    own_rng = rng_state()
    per_rank = [own_rng]
    if run.env.distributed:
        import torch.distributed as dist

        per_rank = [None] * run.env.world_size
        dist.all_gather_object(per_rank, own_rng)
    return {
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "arch": args.arch,
        "conv": run.conv,
        "placement": args.placement,
        "num_classes": args.num_classes or run.loaders.num_classes,
        "in_chans": run.loaders.in_chans,
        "image_size": run.loaders.image_size,
        "state_dict": comp.module.state_dict(),
        "optimizer": comp.optimizer.state_dict(),
        "scheduler": comp.scheduler.state_dict(),
        "scaler": comp.scaler.state_dict() if comp.scaler is not None else None,
        "ema": comp.ema.state_dict() if comp.ema is not None else None,
        "best_prec1": run.state.best_prec1,
        "rng": own_rng,
        "rng_per_rank": per_rank,
        "args": {k: v for k, v in vars(args).items()},
    }


def _save(run: _Run, epoch: int, step_in_epoch: int = 0, is_best: bool = False) -> None:
    args = run.args
    if not args.save_checkpoints:
        return
    state = _checkpoint_state(run, epoch, step_in_epoch)  # collective under DDP: every rank builds it
    if run.env.is_main:
        gather = 0 if step_in_epoch else (10**9 if args.gather_checkpoints < 0 else args.gather_checkpoints)
        save_checkpoint(state, args.workspace, args.checkpoint_filename, is_best=is_best, gather=gather)
    barrier()


def _end_epoch(run: _Run, epoch: int, train_metrics: Dict[str, float]) -> None:
    args, state = run.args, run.state
    _sync_models(run)
    record = dict(train_metrics)
    is_best = False
    if not args.training_only:
        val_metrics = _validate_all(run, epoch)
        record.update(val_metrics)
        is_best = val_metrics["val.top1"] > state.best_prec1 or state.best_prec1 < 0
        state.best_prec1 = max(state.best_prec1, val_metrics["val.top1"])
    run.raport.log((epoch,), record)
    run.last = record
    _print_paths(run)
    state.epoch, state.step_in_epoch = epoch + 1, 0
    _save(run, epoch + 1, 0, is_best)


def _train(run: _Run) -> int:
    args, state, comp = run.args, run.state, run.comp
    end_epoch = args.epochs if args.run_epochs < 0 else min(args.epochs, state.epoch + args.run_epochs)
    if run.resume_rng is not None:
        restore_rng(run.resume_rng)
    with GracefulShutdown() as shutdown:
        for epoch in range(state.epoch, end_epoch):
            run.loaders.set_epoch(epoch)
            set_epoch(comp.module, epoch)
            result = train_one_epoch(comp, run.cfg, run.loaders.train, epoch, run.raport,
                                     lambda: shutdown.requested, start_iteration=state.step_in_epoch)
            if result.interrupted:
                state.step_in_epoch = result.iterations
                _sync_models(run)
                _save(run, epoch, result.iterations)
                return _interrupted(run, shutdown)
            _end_epoch(run, epoch, result.metrics)
            if shutdown.synchronized(run.env.device if run.env.device.type == "cuda" else None):
                return _interrupted(run, shutdown)
    _summary(run)
    return 0


def _interrupted(run: _Run, shutdown: GracefulShutdown) -> int:
    signum = shutdown.signum or 15
    if run.env.is_main:
        where = os.path.join(run.args.workspace, run.args.checkpoint_filename)
        saved = f"checkpoint saved to {where}" if run.args.save_checkpoints else "no checkpoint (--no-checkpoints)"
        print(f"main.py: {shutdown.signal_name or 'signal'} received at epoch {run.state.epoch} "
              f"iteration {run.state.step_in_epoch}; {saved}; continue with --resume {where}",
              file=sys.stderr, flush=True)
    return 128 + int(signum)


def _summary(run: _Run) -> None:
    data: Dict[str, Any] = dict(run.last, **{"summary.epochs": run.state.epoch})
    if run.state.best_prec1 >= 0:
        data["summary.best_top1"] = run.state.best_prec1
    run.raport.log((), data)
    if getattr(run.args, "compile", False) and run.env.is_main:
        from torch._dynamo.utils import counters

        print(f"torch.compile: {counters['stats']['unique_graphs']} graph(s) compiled", flush=True)
    if run.env.is_main or run.env.distributed:
        rank = f"[rank {run.env.rank}] " if run.env.distributed else ""
        print(f"{rank}finished: {run.state.epoch}/{run.args.epochs} epochs"
              + ("" if run.state.best_prec1 < 0 else f", best top1 {run.state.best_prec1:.3f}"), flush=True)

