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
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from image_classification.data import DataError
from image_classification.dynamic import autotune, set_epoch
from image_classification.reporting.tensorboard import TensorBoardScalars

from . import build
from .adversarial import attack_metadata, build_attacks, perturbation_checkpoint, validate_under_attack
from .checkpoint import (
    CheckpointError,
    GracefulShutdown,
    Interrupted,
    WorkspaceLock,
    check_workspace_writable,
    existing_run_files,
    load_checkpoint,
    recorded_args,
    remove_temporaries,
    rng_state,
    save_checkpoint,
)
from .checkpoint import set_rng_state as restore_rng
from .cli import parse_args
from .distributed import (
    DistEnv,
    RanksDisagree,
    barrier,
    check_same_arguments,
    cleanup,
    init_distributed,
    run_defining_arguments,
    sync_buffers,
)
from .engine import (
    LoopConfig,
    NonFiniteLossError,
    TrainingSetup,
    check_finite_validation,
    compile_ahead_or_eager,
    train_one_epoch,
    validate,
)
from .exit_status import (
    EXIT_BAD_INPUT,
    EXIT_DIVERGED,
    UsageError,
    error_line,
    expected_failure,
)
from .logger import Progress, RaportError, RaportWriter
from .precise_bn import recompute_bn_statistics
from .rank_health import PeerMonitor, is_peer_failure

__all__ = ["main", "run", "run_parsed"]

_LOG = logging.getLogger(__name__)




class PeerLost(Exception):
    """Raised by :func:`run` after it reported a lost peer rank; ``exit_code`` is the status to exit with."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"lost a peer rank (exit status {exit_code})")
        self.exit_code = exit_code


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``main.py``; returns the process exit status."""
    return run_parsed(parse_args(argv))


def run_parsed(args: argparse.Namespace) -> int:
    """:func:`main` on arguments already parsed by :func:`~.cli.parse_args`; returns the exit status."""
    status: Optional[int] = None
    try:
        status = run(args)
        return status
    except PeerLost as exc:
        # a process group that lost a peer can block in its destructors (seconds, or for ever with a frozen
        # peer): the message is out, the raport closed and the lock released, so leave at once
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.exit_code)
    finally:
        cleanup(all_ranks_here=status == 0)


@dataclass
class _Run:
    """The objects of one invocation, built by :func:`_prepare`."""

    args: argparse.Namespace
    env: DistEnv
    loaders: Any
    comp: TrainingSetup
    cfg: LoopConfig
    state: build.RunState
    conv: str
    resume_rng: Optional[Dict[str, Any]] = None
    resumed: bool = False
    raport: RaportWriter = field(default_factory=lambda: RaportWriter(None))
    last: Dict[str, float] = field(default_factory=dict)
    lock: Optional[WorkspaceLock] = None
    paths_printed: bool = False
    shutdown: Optional[GracefulShutdown] = None  # while training: a second signal waits for a checkpoint being written


def _refuse_to_replace_a_run(args: argparse.Namespace, resumed: bool) -> None:
    """A new run (or an evaluation) must not silently replace the results of an earlier one."""
    if args.overwrite or resumed:
        return
    raport = _raport_path(args)
    if args.evaluate:  # an evaluation replaces only the raport: refuse when it holds a training run
        if os.path.isfile(raport) and _is_training_raport(raport):
            raise UsageError(ValueError(
                f"{raport} holds the raport of a training run; give --evaluate another --workspace or "
                "--raport-file, or pass --overwrite to replace it"))
        return
    found = existing_run_files(args.workspace, args.checkpoint_filename, raport)
    if args.resume == "auto" and found == [os.path.basename(raport)]:
        return  # a run stopped before its first checkpoint: --resume auto starts it again
    if found:
        raise UsageError(ValueError(
            f"workspace {args.workspace} already holds a run ({', '.join(found[:4])}); continue it with --resume "
            "auto, or pass --overwrite to replace it"))


def _raport_path(args: argparse.Namespace) -> str:
    return args.raport_file if os.path.isabs(args.raport_file) else os.path.join(args.workspace, args.raport_file)


def _is_training_raport(path: str) -> bool:
    from .logger import read_raport

    try:
        records = read_raport(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        _LOG.warning("cannot read the raport %s (%s); treating it as a training run's", path, exc)
        return True  # unreadable: do not replace it blindly
    params: Dict[str, Any] = next((r.get("data", {}) for r in records if r.get("step") == "PARAMETER"), {})
    return not params.get("evaluate", False)


def _prepare(args: argparse.Namespace, env: DistEnv) -> _Run:
    resume_path, resume = build.resolve_resume(args)
    if env.is_main:
        _refuse_to_replace_a_run(args, resume is not None)
    if args.seed is None and resume is not None:  # same data order and streams as the interrupted run
        args.seed = recorded_args(resume).get("seed")
    build.seed_everything(args, env)
    pretrained = None
    if args.pretrained_weights is not None and resume is None:

        pretrained = load_checkpoint(args.pretrained_weights, trusted=args.trust_checkpoints)
    elif args.pretrained_weights is not None and env.is_main:
        print(f"main.py: note: --pretrained-weights {args.pretrained_weights} not used: resuming from "
              f"{resume_path}", file=sys.stderr, flush=True)
    try:
        build.infer_model_fields(args, resume or pretrained, resume_path if resume is not None
                                 else args.pretrained_weights)
    except ValueError as exc:
        raise UsageError(exc) from None
    conv = build.infer_conv(args, resume or pretrained)
    build.resolve_placement(args, conv)
    loaders = build.build_data(args, env)
    try:
        model = build.build_network(args, conv, loaders, env)
    except ValueError as exc:
        raise UsageError(exc) from None
    for checkpoint, path in ((resume, resume_path), (pretrained, args.pretrained_weights)):
        if checkpoint is not None and path is not None:  # a checkpoint comes with its path
            build.load_weights(model, checkpoint, args, conv, path)
    cfg = build.loop_config(args, env)
    try:
        comp = build.build_training_setup(args, model, loaders, env, cfg)
    except ValueError as exc:
        raise UsageError(exc) from None
    if pretrained is not None and comp.ema is not None and pretrained.get("ema") is not None:
        comp.ema.load_state_dict(pretrained["ema"])
    state = build.RunState()
    resume_rng = None
    if resume is not None:
        state = build.restore_training_state(comp, resume, env, accumulation=cfg.accumulation,
                                             training=not args.evaluate)
        if not args.evaluate:
            build.check_resume_position(resume, state, args, env, cfg.iterations(len(loaders.train)))
        if state.epoch > args.epochs and not args.evaluate:
            raise UsageError(ValueError(f"--resume {resume_path} has completed {state.epoch} epochs, more than "
                                        f"--epochs {args.epochs}"))
        resume_rng = _rank_rng(resume, env)
        if env.is_main and not args.evaluate:
            where = (f"epoch {state.epoch}, iteration {state.step_in_epoch}" if state.step_in_epoch
                     else f"the start of epoch {state.epoch}")
            print(f"main.py: resuming from {resume_path} at {where}", file=sys.stderr, flush=True)
        changes = build.changed_flags(resume.get("args"), args)
        if changes and env.is_main:
            print(f"main.py: note: resuming {resume_path} with {', '.join(changes)}: the learning-rate schedule "
                  "and the optimizer follow the command line", file=sys.stderr, flush=True)
    return _Run(args, env, loaders, comp, cfg, state, conv, resume_rng, resumed=resume is not None)


def _rank_rng(checkpoint: Dict[str, Any], env: DistEnv) -> Optional[Dict[str, Any]]:
    per_rank = checkpoint.get("rng_per_rank")
    if isinstance(per_rank, (list, tuple)) and len(per_rank) == env.world_size:
        return per_rank[env.rank]
    return checkpoint.get("rng") if env.world_size == 1 else None


def _open_workspace(run: _Run) -> None:
    """Rank 0: create and lock the workspace, clear what killed writers or an overwritten run left, open the
    raport (appended to when resuming)."""
    args, env = run.args, run.env
    raport_writer = RaportWriter(None)
    if env.is_main:
        workspace = check_workspace_writable(args.workspace)
        run.lock = WorkspaceLock(workspace).acquire()
        leftovers = remove_temporaries(workspace, args.checkpoint_filename)
        if leftovers:
            print(f"main.py: note: removed {len(leftovers)} partial checkpoint(s) of a killed run from {workspace}",
                  file=sys.stderr, flush=True)
        if args.overwrite and not run.resumed and not args.evaluate:
            for name in existing_run_files(workspace, args.checkpoint_filename):
                (workspace / name).unlink()
        path = _raport_path(args)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            # never replaced without --overwrite: a resumed run, a restart of a run stopped before its first
            # checkpoint and a repeated evaluation all continue the file after its records
            raport_writer = RaportWriter(path, append=run.resumed or (os.path.isfile(path) and not args.overwrite))
        except OSError as exc:
            raise CheckpointError(f"cannot write --raport-file {path}: {exc.strerror or exc}") from None
        if args.tensorboard is not None:
            logdir = os.path.join(args.workspace, args.tensorboard)
            raport_writer.mirrors.append(TensorBoardScalars(logdir, run.cfg.iterations(len(run.loaders.train))))
    barrier()
    run.raport = raport_writer
    params = dict(vars(args), conv=run.conv, world_size=env.world_size, device=str(env.device))
    run.raport.log_parameters(params)
    run.raport.log_metadata()


def run(args: argparse.Namespace) -> int:
    """Train or evaluate as ``args`` say; returns the exit status.

    Expected failures end in one line on stderr: bad input (``DataError``, ``CheckpointError``, a bad
    combination of options) with status 2, a diverged run with 3. Under DDP a rank that fails on its own
    records its error for the others; a rank whose collective fails because a peer died, froze or failed
    names that rank (and its error) and raises :class:`PeerLost` with the peer's status (1 when it has
    none), on which :func:`main` exits without tearing down the broken process group.
    """
    if args.local_rank is not None:  # torch.distributed.launch passes --local-rank instead of the variable
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    env: Optional[DistEnv] = None
    monitor: Optional[PeerMonitor] = None
    try:
        try:
            env = init_distributed(args.device, timeout_s=args.dist_timeout)
        except ValueError as exc:
            raise UsageError(exc) from None
        if env.distributed:
            monitor = PeerMonitor(env.rank, env.world_size).start()
            check_same_arguments(run_defining_arguments(args), env.device)
        return _run(args, env)
    except RanksDisagree as exc:  # every rank found it: rank 0 says it once
        code = _report(exc, EXIT_BAD_INPUT, env, None, quiet=env is not None and not env.is_main)
        _tear_down_together(monitor)
        return code
    except NonFiniteLossError as exc:  # all ranks see the same summed loss: rank 0 says it once
        code = _report(exc, EXIT_DIVERGED, env, None, quiet=env is not None and not env.is_main)
        _tear_down_together(monitor)
        return code
    except (DataError, CheckpointError, UsageError, RaportError, RuntimeError) as exc:
        failure = expected_failure(exc, args.workers)
        if failure is not None:
            return _report(failure.message, failure.status, env, monitor)
        if env is None or not env.distributed or monitor is None or not is_peer_failure(exc):
            _post_unexpected(exc, monitor)
            raise
        peer = monitor.diagnose(exc, args.dist_timeout)
        # the lowest-numbered rank that is still alive reports it (rank 0 unless rank 0 is the one lost); when
        # nobody could be named (the store went away with its host), every rank says what it saw
        alive = [r for r in range(env.world_size) if r not in peer.lost]
        if not peer.lost or env.rank == alive[0]:
            prefix = f"[rank {env.rank}] " if not peer.lost and not env.is_main else ""
            print(f"main.py: error: {prefix}{peer.message}", file=sys.stderr, flush=True)
        raise PeerLost(peer.exit_code) from None
    except BaseException as exc:
        _post_unexpected(exc, monitor)
        raise
    finally:
        if monitor is not None:
            monitor.stop()


def _tear_down_together(monitor: Optional[PeerMonitor]) -> None:
    """Every rank stopped at the same collective: stop the heartbeat, then destroy the process group together."""
    if monitor is not None:
        monitor.stop()
    cleanup(all_ranks_here=True)


def _report(message: Any, code: int, env: Optional[DistEnv], monitor: Optional[PeerMonitor],
            quiet: bool = False) -> int:
    """One line on stderr (``[rank N]`` on ranks but 0), the error recorded for the peers; the exit status."""
    if not quiet:
        rank = env.rank if env is not None and env.distributed else None
        print(error_line("main.py", str(message), rank), file=sys.stderr, flush=True)
    if monitor is not None:
        monitor.post_error(str(message), code)
    return code


def _post_unexpected(exc: BaseException, monitor: Optional[PeerMonitor]) -> None:
    if monitor is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
        text = " ".join(str(exc).split())
        monitor.post_error(f"{type(exc).__name__}: {text[:300]} (see its traceback)", 1)


def _run(args: argparse.Namespace, env: DistEnv) -> int:
    run_ = _prepare(args, env)
    try:
        _open_workspace(run_)
        build.save_tuned_paths(args, run_.comp.module, env)
        if args.evaluate:
            return _evaluate(run_)
        return _train(run_)
    finally:
        if run_.lock is not None:  # the workspace exists: keep the paths tuned since (e.g. a last smaller batch)
            build.save_tuned_paths(args, run_.comp.module, env)
        run_.raport.close()
        if run_.lock is not None:
            run_.lock.release()


def _sync_models(run: _Run) -> None:
    """Rank 0's BatchNorm statistics everywhere (model and EMA) before validating or saving."""
    for _, module in run.comp.evaluated_models():
        sync_buffers(module)
    autotune.broadcast_cache()  # PEDConv paths tuned since the last sync: rank 0's choice everywhere


def _print_paths(run: _Run) -> None:
    """``--print-paths``: the path of every PEDConv layer per input shape, once per invocation."""
    if not run.args.print_paths or run.paths_printed or not run.env.is_main:
        return
    from image_classification.dynamic import format_path_report, path_report

    print("PEDConv execution paths (path=auto: tuned or heuristic per input shape):\n"
          + format_path_report(path_report(run.comp.module)), flush=True)
    run.paths_printed = True


def _validate_all(run: _Run, epoch: int) -> Dict[str, float]:
    comp, cfg = run.comp, run.cfg
    # the unwrapped model: shards differ in batch count, so no per-batch collective (DDP's buffer broadcast)
    metrics: Dict[str, float] = {}
    for name, module in comp.evaluated_models():
        metrics.update(validate(module, cfg, run.loaders.val, comp.criterion, name, epoch))
    return metrics


def _evaluate(run: _Run) -> int:
    run.loaders.set_epoch(run.state.epoch)
    _precise_bn(run, run.state.epoch)
    metrics = _validate_all(run, run.state.epoch)
    robust = _attack_all(run, run.state.epoch)
    for prefix, _ in _robust_descriptions(run):
        for name, meta in attack_metadata(prefix).items():
            run.raport.metadata(name, meta)
    metrics.update(robust)
    run.raport.log((run.state.epoch,), metrics)
    run.raport.log((), metrics)
    for prefix in ("val", "val_ema"):  # logged first: the raport shows the NaN; exit status 3, as in training
        check_finite_validation(metrics, prefix, run.state.epoch, evaluating=True)
    _print_paths(run)
    if run.env.is_main:
        print(f"evaluation: top1 {metrics['val.top1']:.3f}  top5 {metrics['val.top5']:.3f}  "
              f"loss {metrics['val.loss']:.4f}  ({int(metrics['val.samples'])} images)", flush=True)
        for prefix, description in _robust_descriptions(run):
            print(f"under attack: {description}: {'EMA ' if '_ema_' in prefix else ''}top1 "
                  f"{metrics[prefix + '.top1']:.3f}  top5 {metrics[prefix + '.top5']:.3f}  "
                  f"(natural top1 {metrics[prefix.split('_pgd')[0] + '.top1']:.3f})", flush=True)
    return 0


def _robust_descriptions(run: _Run) -> List[Tuple[str, str]]:
    """``(metric prefix, attack)`` of every model and ``--attack-steps`` value: ``val_pgd10``, ``val_ema_pgd10``."""
    attacks = build_attacks(run.args, run.loaders, run.cfg)
    return [(f"{name}_pgd{attack.steps}", attack.describe()) for name, _ in run.comp.evaluated_models()
            for attack in attacks]


def _attack_all(run: _Run, epoch: int) -> Dict[str, float]:
    """``--attack pgd``: top-1 of the model (and the EMA model) under each PGD attack, on the validation set."""
    comp, cfg = run.comp, run.cfg
    metrics: Dict[str, float] = {}
    for name, model in comp.evaluated_models():
        for attack in build_attacks(run.args, run.loaders, cfg):
            metrics.update(validate_under_attack(model, cfg, run.loaders.val, comp.criterion, attack,
                                                 f"{name}_pgd{attack.steps}", epoch, run.args.seed, run.env.rank))
    return metrics


def _checkpoint_state(run: _Run, epoch: int, step_in_epoch: int) -> Dict[str, Any]:
    comp, args = run.comp, run.args
    own_rng = rng_state()
    per_rank: List[Optional[Dict[str, Any]]] = [own_rng]
    if run.env.distributed:
        import torch.distributed as dist

        per_rank = [None] * run.env.world_size
        dist.all_gather_object(per_rank, own_rng)
    return {
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        # the interrupted epoch's loss/top-1/sample/time totals: its summary after the resume covers the whole epoch
        "epoch_totals": run.state.epoch_totals if step_in_epoch else None,
        "world_size": run.env.world_size,
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
        "pending_validation": run.state.pending_validation,
        "rng": own_rng,
        "rng_per_rank": per_rank,
        "adversarial": perturbation_checkpoint(comp.adversary, run.env.world_size),  # collective under DDP
        "args": {k: v for k, v in vars(args).items()},
    }


def _save(run: _Run, epoch: int, step_in_epoch: int = 0, is_best: bool = False, gather: bool = True) -> None:
    args = run.args
    if not args.save_checkpoints:
        return
    state = _checkpoint_state(run, epoch, step_in_epoch)  # collective under DDP: every rank builds it
    if run.env.is_main:
        keep = 10**9 if args.gather_checkpoints < 0 else args.gather_checkpoints
        copies = 0 if step_in_epoch or not gather else keep
        with run.shutdown.saving() if run.shutdown is not None else contextlib.nullcontext():
            save_checkpoint(state, args.workspace, args.checkpoint_filename, is_best=is_best, gather=copies)
    barrier()


def _precise_bn(run: _Run, epoch: int) -> None:
    """``--precise-bn N``: recompute every BatchNorm's statistics (model and EMA) over N training batches."""
    requested = run.args.precise_bn
    if requested <= 0:
        return
    cfg, comp = run.cfg, run.comp
    models = [module for _, module in comp.evaluated_models()]
    total = min(requested, cfg.iterations(len(run.loaders.train)))
    progress = Progress(f"Epoch {epoch} precise-bn", total, cfg.print_freq, enabled=cfg.is_main)

    def report(done: int) -> None:
        if done % cfg.print_freq == 0 or done == total:
            progress.update(done, {})
        else:
            progress.tick(done)

    # free adversarial training: the statistics of the perturbed images that training normalises
    prepare = cfg.to_device if comp.adversary is None else comp.adversary.calibration_prepare(cfg.to_device)
    used = recompute_bn_statistics(models, run.loaders.calibration_batches(), total, prepare=prepare,
                                   autocast=cfg.autocast, progress=report)
    progress.close({"batches": used})


def _validate_epoch(run: _Run, epoch: int, record: Dict[str, float]) -> bool:
    """Validate after ``epoch``, update the best top-1 and ``record``; True when this is the best model."""
    state = run.state
    val_metrics = _validate_all(run, epoch)
    record.update(val_metrics)
    try:
        for prefix in ("val", "val_ema"):
            check_finite_validation(val_metrics, prefix, epoch)
    except NonFiniteLossError:
        run.raport.log((epoch,), record)  # the raport shows the epoch that diverged
        raise
    is_best = val_metrics["val.top1"] > state.best_prec1 or state.best_prec1 < 0
    state.best_prec1 = max(state.best_prec1, val_metrics["val.top1"])
    state.pending_validation = False
    return is_best


def _check_finite_weights(run: _Run, epoch: int, iteration: Optional[int] = None) -> None:
    """Refuse to save (or validate) weights or BatchNorm statistics holding NaN/inf: the previous checkpoint
    stays the last good one."""
    for name, model in run.comp.evaluated_models():
        label = "EMA model" if name == "val_ema" else "model"
        tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
        if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            where = f"epoch {epoch}" + (f" iteration {iteration}" if iteration is not None else "")
            raise NonFiniteLossError(
                f"the {label}'s weights or BatchNorm statistics are not finite (NaN/inf) at {where}: the run "
                "diverged (lower --lr, add --warmup); the previous checkpoint is kept")


def _end_epoch(run: _Run, epoch: int, train_metrics: Dict[str, float]) -> None:
    args, state = run.args, run.state
    _sync_models(run)
    _check_finite_weights(run, epoch)
    _precise_bn(run, epoch)
    record = dict(train_metrics)
    is_best = False
    state.epoch, state.step_in_epoch, state.epoch_totals = epoch + 1, 0, None
    if not args.training_only:
        # the trained epoch reaches the disk before validation (a bad val image or a crash there loses
        # nothing); the checkpoint says so, and --resume validates it first
        state.pending_validation = True
        _save(run, epoch + 1, 0, gather=False)
        is_best = _validate_epoch(run, epoch, record)
    run.raport.log((epoch,), record)
    run.last = record
    _print_paths(run)
    _save(run, epoch + 1, 0, is_best)


def _finish_pending_validation(run: _Run) -> None:
    """A resumed checkpoint written before its epoch was validated: validate, log and save it now."""
    state = run.state
    if not state.pending_validation or run.args.training_only or state.epoch < 1:
        state.pending_validation = False
        return
    record: Dict[str, float] = {}
    is_best = _validate_epoch(run, state.epoch - 1, record)
    run.raport.log((state.epoch - 1,), record)
    run.last = record
    _save(run, state.epoch, 0, is_best)


def _train(run: _Run) -> int:
    args, state, comp = run.args, run.state, run.comp
    end_epoch = args.epochs if args.run_epochs < 0 else min(args.epochs, state.epoch + args.run_epochs)
    if run.resume_rng is not None:
        restore_rng(run.resume_rng)
    with GracefulShutdown() as shutdown:
        run.shutdown = shutdown
        if args.compile:
            said = ("main.py: {signal} received while compiling; nothing trained since the start or the checkpoint, "
                    "so nothing to save") if run.env.is_main else ""
            try:
                with shutdown.nothing_to_save(exit_message=said):  # exits from the handler: no unwinding through C++
                    _compile_ahead(run)
            except Interrupted as exc:
                if run.env.is_main:
                    print(f"main.py: {signal.Signals(exc.signum).name} received while compiling; nothing trained "
                          "since the start or the checkpoint, so nothing to save", file=sys.stderr, flush=True)
                return 128 + exc.signum
        _finish_pending_validation(run)
        for epoch in range(state.epoch, end_epoch):
            run.loaders.set_epoch(epoch)
            set_epoch(comp.module, epoch)
            result = train_one_epoch(comp, run.cfg, run.loaders.train, epoch, run.raport,
                                     lambda: shutdown.requested, start_iteration=state.step_in_epoch,
                                     resumed_totals=state.epoch_totals)
            if result.interrupted:
                state.step_in_epoch, state.epoch_totals = result.iterations, result.totals
                _sync_models(run)
                _check_finite_weights(run, epoch, result.iterations)
                _save(run, epoch, result.iterations)
                return _interrupted(run, shutdown)
            _end_epoch(run, epoch, result.metrics)
            if shutdown.synchronized(run.env.device if run.env.device.type == "cuda" else None):
                return _interrupted(run, shutdown)
    _summary(run)
    return 0


def _compile_ahead(run: _Run) -> None:
    """``--compile``: trace and compile the training and validation graphs before the first epoch, saying so."""
    args, loaders = run.args, run.loaders
    size = (loaders.in_chans, loaders.image_size, loaders.image_size)
    val_batch = args.val_batch_size or args.batch_size
    if run.env.is_main:
        print(f"main.py: compiling the model (torch.compile, backend {args.compile_backend}, static shapes): the "
              f"training step at batch {args.batch_size}" + ("" if args.training_only else
                                                             f" and validation at batch {val_batch}") +
              "; minutes on a CPU, and SIGTERM/SIGINT stop it at once", flush=True)
    started = time.perf_counter()
    eager_because = compile_ahead_or_eager(run.comp, run.cfg, (args.batch_size, *size), (val_batch, *size))
    if run.env.is_main:
        print(f"main.py: {eager_because}" if eager_because else
              f"main.py: compiled in {time.perf_counter() - started:.1f} s", flush=True)


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
    if run.args.compile and run.env.is_main:
        from torch._dynamo.utils import counters

        print(f"torch.compile: {counters['stats']['unique_graphs']} graph(s) compiled", flush=True)
    if run.env.is_main or run.env.distributed:
        rank = f"[rank {run.env.rank}] " if run.env.distributed else ""
        print(f"{rank}finished: {run.state.epoch}/{run.args.epochs} epochs"
              + ("" if run.state.best_prec1 < 0 else f", best top1 {run.state.best_prec1:.3f}"), flush=True)

