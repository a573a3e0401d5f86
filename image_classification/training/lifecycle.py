"""One invocation of ``main.py`` as one object: :class:`TrainingRun`.

:meth:`TrainingRun.prepare` reads the checkpoints and the data and builds the model, the optimizer and the rest
(only reading the disk, so a bad input ends before anything is written); :meth:`TrainingRun.execute` then creates
and locks the workspace, opens the raport, and evaluates or trains epoch by epoch -- validating, re-estimating
BatchNorm statistics, checkpointing (atomically, the trained epoch before its validation) and writing the
summary. What a failure means for the exit status is :mod:`.trainer`'s business (with :mod:`.exit_status`).
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
from typing import Any, Dict, List, Optional, Tuple

import torch

from image_classification.data import Loaders
from image_classification.dynamic import autotune, set_epoch
from image_classification.reporting.tensorboard import TensorBoardScalars, remove_event_files

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
from .distributed import (
    DistEnv,
    barrier,
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
    UsageError,
    signal_status,
    usage_errors,
)
from .logger import Progress, RaportWriter
from .precise_bn import recompute_bn_statistics

__all__ = ["TrainingRun"]

_LOG = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """The objects of one invocation (arguments, ranks, data, model and optimizer, loop settings, the position
    in the schedule) and the steps of its life, from :meth:`prepare` to the summary."""

    args: argparse.Namespace
    env: DistEnv
    loaders: Loaders
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

    @classmethod
    def prepare(cls, args: argparse.Namespace, env: DistEnv) -> TrainingRun:
        """Everything the run needs, read and built without writing anything: the ``--resume`` and
        ``--pretrained-weights`` checkpoints, the seed, the model fields a checkpoint implies, the data, the
        network and its weights, the training setup and the restored position."""
        resume_path, resume = build.resolve_resume(args)
        if env.is_main:
            _refuse_to_replace_a_run(args, resume is not None)
        if args.seed is None and resume is not None:  # same data order and streams as the interrupted run
            args.seed = recorded_args(resume).get("seed")
        drawn = args.seed is None
        build.seed_everything(args, env)
        if drawn and env.is_main and (args.train_subset or args.val_subset):
            print(f"main.py: note: no --seed, so the --train-subset/--val-subset images were drawn with seed "
                  f"{args.seed}; pass --seed {args.seed} to use the same images again", file=sys.stderr, flush=True)
        pretrained = None
        if args.pretrained_weights is not None and resume is None:
            pretrained = load_checkpoint(args.pretrained_weights, trusted=args.trust_checkpoints)
        elif args.pretrained_weights is not None and env.is_main:
            print(f"main.py: note: --pretrained-weights {args.pretrained_weights} not used: resuming from "
                  f"{resume_path}", file=sys.stderr, flush=True)
        with usage_errors():
            build.infer_model_fields(args, resume or pretrained, resume_path if resume is not None
                                     else args.pretrained_weights)
        conv = build.infer_conv(args, resume or pretrained)
        build.resolve_placement(args, conv)
        loaders = build.build_data(args, env)
        with usage_errors():
            model = build.build_network(args, conv, loaders, env)
        for checkpoint, path in ((resume, resume_path), (pretrained, args.pretrained_weights)):
            if checkpoint is not None and path is not None:  # a checkpoint comes with its path
                build.load_weights(model, checkpoint, args, conv, path)
        # after the weights: a checkpoint that does not fit the model is refused before seconds of path timing
        build.tune_paths(args, model, loaders, env)
        cfg = build.loop_config(args, env)
        with usage_errors():
            comp = build.build_training_setup(args, model, loaders, env, cfg)
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
            # an evaluation follows no schedule: '--epochs 1 -> 90' would tell it nothing
            changes = build.changed_flags(resume.get("args"), args) if not args.evaluate else []
            if changes and env.is_main:
                print(f"main.py: note: resuming {resume_path} with {', '.join(changes)}: the learning-rate schedule "
                      "and the optimizer follow the command line", file=sys.stderr, flush=True)
        return cls(args, env, loaders, comp, cfg, state, conv, resume_rng, resumed=resume is not None)

    def execute(self) -> int:
        """Open the workspace, then evaluate (``--evaluate``) or train; returns the exit status. The raport is
        closed and the workspace lock released however it ends."""
        args, env = self.args, self.env
        try:
            self.open_workspace()
            build.save_tuned_paths(args, self.comp.module, env)
            if args.evaluate:
                return self.evaluate()
            return self.train()
        finally:
            if self.lock is not None:  # the workspace exists: keep the paths tuned since (e.g. a last smaller batch)
                build.save_tuned_paths(args, self.comp.module, env)
            self.raport.close()
            if self.lock is not None:
                self.lock.release()

    def open_workspace(self) -> None:
        """Rank 0: create and lock the workspace, clear what killed writers or an overwritten run left, open the
        raport (appended to when resuming)."""
        args, env = self.args, self.env
        raport_writer = RaportWriter(None)
        if env.is_main:
            workspace = check_workspace_writable(args.workspace)
            self.lock = WorkspaceLock(workspace).acquire()
            leftovers = remove_temporaries(workspace, args.checkpoint_filename)
            if leftovers:
                print(f"main.py: note: removed {len(leftovers)} partial checkpoint(s) of a killed run from {workspace}",
                      file=sys.stderr, flush=True)
            if args.overwrite and not self.resumed and not args.evaluate:
                for name in existing_run_files(workspace, args.checkpoint_filename):
                    (workspace / name).unlink()
            path = _raport_path(args)
            if os.path.isfile(path) and not self.resumed and not args.overwrite and os.path.getsize(path) > 0:
                # a run that continues no checkpoint of its own adds its records after another run's
                what = "evaluation" if args.evaluate else "run"
                print(f"main.py: note: {path} already holds records (an earlier run, stopped before its first "
                      f"checkpoint, or an evaluation); this {what} is appended after them (--overwrite replaces the "
                      "file, --raport-file NAME writes another)", file=sys.stderr, flush=True)
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                # never replaced without --overwrite: a resumed run, a restart of a run stopped before its first
                # checkpoint and a repeated evaluation all continue the file after its records
                raport_writer = RaportWriter(path, append=self.resumed or (os.path.isfile(path) and not args.overwrite))
            except OSError as exc:
                raise CheckpointError(f"cannot write --raport-file {path}: {exc.strerror or exc}") from None
            if args.tensorboard is not None:
                logdir = os.path.join(args.workspace, args.tensorboard)
                if args.overwrite:  # the replaced run's curves go with its raport
                    remove_event_files(logdir)
                raport_writer.mirrors.append(TensorBoardScalars(logdir, self.cfg.iterations(len(self.loaders.train)),
                                                                owner=os.path.abspath(path)))
        barrier()
        self.raport = raport_writer
        params = dict(vars(args), conv=self.conv, world_size=env.world_size, device=str(env.device))
        self.raport.log_parameters(params)
        self.raport.log_metadata()

    def _sync_models(self) -> None:
        """Rank 0's BatchNorm statistics everywhere (model and EMA) before validating or saving."""
        for _, module in self.comp.evaluated_models():
            sync_buffers(module)
        autotune.broadcast_cache()  # PEDConv paths tuned since the last sync: rank 0's choice everywhere

    def _print_paths(self) -> None:
        """``--print-paths``: the path of every PEDConv layer per input shape, once per invocation."""
        if not self.args.print_paths or self.paths_printed or not self.env.is_main:
            return
        from image_classification.dynamic import format_path_report, path_report

        print("PEDConv execution paths (path=auto: tuned or heuristic per input shape):\n"
              + format_path_report(path_report(self.comp.module)), flush=True)
        self.paths_printed = True

    def _validate_all(self, epoch: int) -> Dict[str, float]:
        comp, cfg = self.comp, self.cfg
        # the unwrapped model: shards differ in batch count, so no per-batch collective (DDP's buffer broadcast)
        metrics: Dict[str, float] = {}
        note = ("{signal} received during validation: it runs to its end first (its figures cover the whole set), "
                "then the run stops" + (" with a checkpoint" if not self.args.evaluate else ""))
        with self.shutdown.announcing(note) if self.shutdown is not None and self.env.is_main \
                else contextlib.nullcontext():
            for name, module in comp.evaluated_models():
                metrics.update(validate(module, cfg, self.loaders.val, comp.criterion, name, epoch))
        return metrics

    def evaluate(self) -> int:
        self.loaders.set_epoch(self.state.epoch)
        self._precise_bn(self.state.epoch)
        metrics = self._validate_all(self.state.epoch)
        robust = self._attack_all(self.state.epoch)
        for prefix, _ in self._robust_descriptions():
            for name, meta in attack_metadata(prefix).items():
                self.raport.metadata(name, meta)
        metrics.update(robust)
        self.raport.log((self.state.epoch,), metrics)
        self.raport.log((), metrics)
        for prefix in ("val", "val_ema"):  # logged first: the raport shows the NaN; exit status 3, as in training
            check_finite_validation(metrics, prefix, self.state.epoch, evaluating=True)
        self._print_paths()
        if self.env.is_main:
            print(f"evaluation: top1 {metrics['val.top1']:.3f}  top5 {metrics['val.top5']:.3f}  "
                  f"loss {metrics['val.loss']:.4f}  ({int(metrics['val.samples'])} images)", flush=True)
            for prefix, description in self._robust_descriptions():
                print(f"under attack: {description}: {'EMA ' if '_ema_' in prefix else ''}top1 "
                      f"{metrics[prefix + '.top1']:.3f}  top5 {metrics[prefix + '.top5']:.3f}  "
                      f"(natural top1 {metrics[prefix.split('_pgd')[0] + '.top1']:.3f})", flush=True)
        return 0

    def _robust_descriptions(self) -> List[Tuple[str, str]]:
        """``(metric prefix, attack)`` of every model and ``--attack-steps`` value: ``val_pgd10``, ``val_ema_pgd10``."""
        attacks = build_attacks(self.args, self.loaders, self.cfg)
        return [(f"{name}_pgd{attack.steps}", attack.describe()) for name, _ in self.comp.evaluated_models()
                for attack in attacks]

    def _attack_all(self, epoch: int) -> Dict[str, float]:
        """``--attack pgd``: top-1 of the model (and the EMA model) under each PGD attack, on the validation set."""
        comp, cfg = self.comp, self.cfg
        metrics: Dict[str, float] = {}
        for name, model in comp.evaluated_models():
            for attack in build_attacks(self.args, self.loaders, cfg):
                metrics.update(validate_under_attack(model, cfg, self.loaders.val, comp.criterion, attack,
                                                     f"{name}_pgd{attack.steps}", epoch, self.args.seed, self.env.rank))
        return metrics

    def _checkpoint_state(self, epoch: int, step_in_epoch: int) -> Dict[str, Any]:
        comp, args = self.comp, self.args
        own_rng = rng_state()
        per_rank: List[Optional[Dict[str, Any]]] = [own_rng]
        if self.env.distributed:
            import torch.distributed as dist

            per_rank = [None] * self.env.world_size
            dist.all_gather_object(per_rank, own_rng)
        return {
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            # the interrupted epoch's loss/top-1/sample/time totals: its summary after the resume covers the whole epoch
            "epoch_totals": self.state.epoch_totals if step_in_epoch else None,
            "world_size": self.env.world_size,
            "arch": args.arch,
            "conv": self.conv,
            "placement": args.placement,
            "num_classes": args.num_classes or self.loaders.num_classes,
            "in_chans": self.loaders.in_chans,
            "image_size": self.loaders.image_size,
            "state_dict": comp.module.state_dict(),
            "optimizer": comp.optimizer.state_dict(),
            "scheduler": comp.scheduler.state_dict(),
            "scaler": comp.scaler.state_dict() if comp.scaler is not None else None,
            "ema": comp.ema.state_dict() if comp.ema is not None else None,
            "best_prec1": self.state.best_prec1,
            "pending_validation": self.state.pending_validation,
            "rng": own_rng,
            "rng_per_rank": per_rank,
            "adversarial": perturbation_checkpoint(comp.adversary, self.env.world_size),  # collective under DDP
            "args": {k: v for k, v in vars(args).items()},
        }

    def _save(self, epoch: int, step_in_epoch: int = 0, is_best: bool = False, gather: bool = True) -> None:
        args = self.args
        if not args.save_checkpoints:
            return
        state = self._checkpoint_state(epoch, step_in_epoch)  # collective under DDP: every rank builds it
        if self.env.is_main:
            keep = 10**9 if args.gather_checkpoints < 0 else args.gather_checkpoints
            copies = 0 if step_in_epoch or not gather else keep
            with self.shutdown.saving() if self.shutdown is not None else contextlib.nullcontext():
                save_checkpoint(state, args.workspace, args.checkpoint_filename, is_best=is_best, gather=copies)
        barrier()

    def _precise_bn(self, epoch: int) -> None:
        """``--precise-bn N``: recompute every BatchNorm's statistics (model and EMA) over N training batches."""
        requested = self.args.precise_bn
        if requested <= 0:
            return
        cfg, comp = self.cfg, self.comp
        models = [module for _, module in comp.evaluated_models()]
        total = min(requested, cfg.iterations(len(self.loaders.train)))
        progress = Progress(f"Epoch {epoch} precise-bn", total, cfg.print_freq, enabled=cfg.is_main)

        def report(done: int) -> None:
            if done % cfg.print_freq == 0 or done == total:
                progress.update(done, {})
            else:
                progress.tick(done)

        # free adversarial training: the statistics of the perturbed images that training normalises
        prepare = cfg.to_device if comp.adversary is None else comp.adversary.calibration_prepare(cfg.to_device)
        used = recompute_bn_statistics(models, self.loaders.calibration_batches(), total, prepare=prepare,
                                       autocast=cfg.autocast, progress=report)
        progress.close({"batches": used})

    def _validate_epoch(self, epoch: int, record: Dict[str, float]) -> bool:
        """Validate after ``epoch``, update the best top-1 and ``record``; True when this is the best model."""
        state = self.state
        val_metrics = self._validate_all(epoch)
        record.update(val_metrics)
        try:
            for prefix in ("val", "val_ema"):
                check_finite_validation(val_metrics, prefix, epoch)
        except NonFiniteLossError:
            self.raport.log((epoch,), record)  # the raport shows the epoch that diverged
            raise
        is_best = val_metrics["val.top1"] > state.best_prec1 or state.best_prec1 < 0
        state.best_prec1 = max(state.best_prec1, val_metrics["val.top1"])
        state.pending_validation = False
        return is_best

    def _check_finite_weights(self, epoch: int, iteration: Optional[int] = None) -> None:
        """Refuse to save (or validate) weights or BatchNorm statistics holding NaN/inf: the previous checkpoint
        stays the last good one."""
        for name, model in self.comp.evaluated_models():
            label = "EMA model" if name == "val_ema" else "model"
            tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
            if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
                where = f"epoch {epoch}" + (f" iteration {iteration}" if iteration is not None else "")
                raise NonFiniteLossError(
                    f"the {label}'s weights or BatchNorm statistics are not finite (NaN/inf) at {where}: the run "
                    "diverged (lower --lr, add --warmup); the previous checkpoint is kept")

    def _end_epoch(self, epoch: int, train_metrics: Dict[str, float]) -> None:
        args, state = self.args, self.state
        self._sync_models()
        self._check_finite_weights(epoch)
        self._precise_bn(epoch)
        record = dict(train_metrics)
        is_best = False
        state.epoch, state.step_in_epoch, state.epoch_totals = epoch + 1, 0, None
        if not args.training_only:
            # the trained epoch reaches the disk before validation (a bad val image or a crash there loses
            # nothing); the checkpoint says so, and --resume validates it first
            state.pending_validation = True
            self._save(epoch + 1, 0, gather=False)
            is_best = self._validate_epoch(epoch, record)
        self.raport.log((epoch,), record)
        self.last = record
        self._print_paths()
        self._save(epoch + 1, 0, is_best)

    def _finish_pending_validation(self) -> None:
        """A resumed checkpoint written before its epoch was validated: validate, log and save it now."""
        state = self.state
        if not state.pending_validation or self.args.training_only or state.epoch < 1:
            state.pending_validation = False
            return
        record: Dict[str, float] = {}
        is_best = self._validate_epoch(state.epoch - 1, record)
        self.raport.log((state.epoch - 1,), record)
        self.last = record
        self._save(state.epoch, 0, is_best)

    def train(self) -> int:
        args, state, comp = self.args, self.state, self.comp
        end_epoch = args.epochs if args.run_epochs < 0 else min(args.epochs, state.epoch + args.run_epochs)
        if self.resume_rng is not None:
            restore_rng(self.resume_rng)
        with GracefulShutdown() as shutdown:
            self.shutdown = shutdown
            if args.compile:
                said = ("main.py: {signal} received while compiling; nothing trained since the start or the "
                        "checkpoint, so nothing to save") if self.env.is_main else ""
                try:
                    # exits from the handler: no unwinding through C++
                    with shutdown.nothing_to_save(exit_message=said):
                        self._compile_ahead()
                except Interrupted as exc:
                    if said:
                        print(said.format(signal=signal.Signals(exc.signum).name), file=sys.stderr, flush=True)
                    return signal_status(exc.signum)
            self._finish_pending_validation()
            for epoch in range(state.epoch, end_epoch):
                self.loaders.set_epoch(epoch)
                set_epoch(comp.module, epoch)
                result = train_one_epoch(comp, self.cfg, self.loaders.train, epoch, self.raport,
                                         lambda: shutdown.requested, start_iteration=state.step_in_epoch,
                                         resumed_totals=state.epoch_totals)
                if result.interrupted:
                    state.step_in_epoch, state.epoch_totals = result.iterations, result.totals
                    self._sync_models()
                    self._check_finite_weights(epoch, result.iterations)
                    self._save(epoch, result.iterations)
                    return self._interrupted(shutdown)
                self._end_epoch(epoch, result.metrics)
                if shutdown.synchronized(self.env.device if self.env.device.type == "cuda" else None):
                    return self._interrupted(shutdown)
        self._summary()
        return 0

    def _compile_ahead(self) -> None:
        """``--compile``: trace and compile the training and validation graphs before the first epoch, saying so."""
        args, loaders = self.args, self.loaders
        size = (loaders.in_chans, loaders.image_size, loaders.image_size)
        val_batch = args.val_batch_size or args.batch_size
        if self.env.is_main:
            print(f"main.py: compiling the model (torch.compile, backend {args.compile_backend}, static shapes): the "
                  f"training step at batch {args.batch_size}" + ("" if args.training_only else
                                                                 f" and validation at batch {val_batch}") +
                  "; minutes on a CPU, and SIGTERM/SIGINT stop it at once", flush=True)
        started = time.perf_counter()
        eager_because = compile_ahead_or_eager(self.comp, self.cfg, (args.batch_size, *size), (val_batch, *size))
        if self.env.is_main:
            print(f"main.py: {eager_because}" if eager_because else
                  f"main.py: compiled in {time.perf_counter() - started:.1f} s", flush=True)

    def _interrupted(self, shutdown: GracefulShutdown) -> int:
        signum = shutdown.signum
        if self.env.is_main:
            where = os.path.join(self.args.workspace, self.args.checkpoint_filename)
            saved = f"checkpoint saved to {where}" if self.args.save_checkpoints else "no checkpoint (--no-checkpoints)"
            print(f"main.py: {shutdown.signal_name or 'signal'} received at epoch {self.state.epoch} "
                  f"iteration {self.state.step_in_epoch}; {saved}; continue with --resume {where}",
                  file=sys.stderr, flush=True)
        return signal_status(signum)

    def _summary(self) -> None:
        data: Dict[str, Any] = dict(self.last, **{"summary.epochs": self.state.epoch})
        if self.state.best_prec1 >= 0:
            data["summary.best_top1"] = self.state.best_prec1
        self.raport.log((), data)
        if self.args.compile and self.env.is_main:
            from torch._dynamo.utils import counters

            print(f"torch.compile: {counters['stats']['unique_graphs']} graph(s) compiled", flush=True)
        if self.env.is_main or self.env.distributed:
            rank = f"[rank {self.env.rank}] " if self.env.distributed else ""
            print(f"{rank}finished: {self.state.epoch}/{self.args.epochs} epochs"
                  + ("" if self.state.best_prec1 < 0 else f", best top1 {self.state.best_prec1:.3f}"), flush=True)


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


def _rank_rng(checkpoint: Dict[str, Any], env: DistEnv) -> Optional[Dict[str, Any]]:
    per_rank = checkpoint.get("rng_per_rank")
    if isinstance(per_rank, (list, tuple)) and len(per_rank) == env.world_size:
        return per_rank[env.rank]
    return checkpoint.get("rng") if env.world_size == 1 else None
