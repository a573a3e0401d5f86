"""Building what a run needs from the parsed arguments: seed, data, model, optimizer state, resume.

Everything here only reads the disk: the workspace is created and written by the trainer afterwards,
so a bad input (``DataError``, ``CheckpointError``, ``ValueError``) leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import numbers
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, cast

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from image_classification.data import DataConfig, Loaders, build_loaders, list_datasets
from image_classification.dynamic.registry import implied_spec

from .checkpoint import (
    CheckpointError,
    GracefulShutdown,
    check_model_fields,
    load_checkpoint,
    load_model_weights,
    recorded_arch,
    recorded_args,
)
from .cli import FALLBACK_ARCH, FALLBACK_DATASET, training_flags
from .distributed import DistEnv, align_gradient_strides, broadcast_int
from .engine import LoopConfig, TrainingSetup
from .optim import LRSchedule, build_scheduler, optimizer_from_args, optimizer_name

__all__ = ["seed_everything", "resolve_resume", "infer_conv", "build_data", "build_network", "build_training_setup",
           "loop_config", "RunState", "restore_training_state", "checkpoint_position", "changed_flags",
           "tune_paths", "infer_model_fields", "save_tuned_paths", "path_cache_files", "resolve_placement",
           "check_resume_position"]

_AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def seed_everything(args: argparse.Namespace, env: DistEnv) -> int:
    """Fix ``args.seed`` (random when absent, identical on every rank) and seed python/numpy/torch."""
    seed = args.seed
    if seed is None:
        seed = broadcast_int(int.from_bytes(os.urandom(4), "little") >> 1, env.device)
    args.seed = int(seed)
    local = args.seed + env.rank
    random.seed(local)
    torch.manual_seed(local)
    try:
        import numpy as np

        np.random.seed(local % 2**32)
    except ImportError:  # pragma: no cover
        pass
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = not args.deterministic
        torch.backends.cudnn.deterministic = bool(args.deterministic)
    return args.seed


def resolve_resume(args: argparse.Namespace) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """Path and content of the ``--resume`` checkpoint (``auto``: the workspace checkpoint if it exists)."""
    path = args.resume
    if path == "auto":
        path = os.path.join(args.workspace, args.checkpoint_filename)
        if not os.path.isfile(path):
            if args.evaluate and args.pretrained_weights is None:  # nothing else to evaluate: never random weights
                raise CheckpointError(f"--evaluate --resume auto: {path} does not exist, so there are no weights to "
                                      "evaluate; give --pretrained-weights FILE or --resume FILE")
            return None, None
    if path is None:
        return None, None
    checkpoint = load_checkpoint(path, trusted=args.trust_checkpoints)
    if "epoch" not in checkpoint or "optimizer" not in checkpoint:
        raise CheckpointError(
            f"--resume {path} holds weights only (no epoch/optimizer state); use --pretrained-weights"
        )
    return path, checkpoint


def resolve_placement(args: argparse.Namespace, conv: str) -> None:
    """``--placement`` not given (nor by a recipe or the checkpoint): the operator's ``default_placement``."""
    from image_classification.dynamic.registry import operator_class

    if args.placement is None:
        args.placement = operator_class(conv).default_placement


def infer_conv(args: argparse.Namespace, checkpoint: Optional[Dict[str, Any]]) -> str:
    """``--conv``/``--dynamic`` when given, else the checkpoint's operator, else ``static``.

    A checkpoint without an operator field may be in a foreign layout that implies one (the authors'
    PEDConv checkpoints: their README evaluates them without ``--dynamic``).
    """
    if args.conv is not None:
        return args.conv
    if checkpoint is not None:
        if checkpoint.get("conv"):
            return str(checkpoint["conv"])
        implied = implied_spec(checkpoint.get("state_dict", {}))
        if implied is not None:
            return implied
    return "static"


def infer_model_fields(args: argparse.Namespace, checkpoint: Optional[Dict[str, Any]], path: Optional[str]) -> None:
    """``--arch``/``--placement``/``--dataset`` not given: the checkpoint's (``--evaluate``, ``--resume``,
    fine-tuning), else the parser's fallbacks. An explicit ``--arch``/``--conv`` the checkpoint contradicts is a
    :class:`CheckpointError` naming both, raised here, before any model is built or tuned."""
    from image_classification.models import list_archs

    if checkpoint is not None:
        check_model_fields(checkpoint, args.arch, args.conv, f"checkpoint {path}")
        saved = recorded_arch(checkpoint)
        if args.arch is None and saved is not None:
            if saved not in list_archs():
                raise CheckpointError(f"checkpoint {path} records arch {saved!r}, which this version does not "
                                      f"know; give --arch (valid: {', '.join(list_archs())})")
            args.arch = saved
        if args.placement is None and isinstance(checkpoint.get("placement"), str):
            args.placement = checkpoint["placement"]
    args.arch = args.arch or FALLBACK_ARCH
    if args.dataset is None:  # not given: the dataset the checkpoint was trained on (its recorded arguments)
        saved = recorded_args(checkpoint).get("dataset") if checkpoint is not None else None
        args.dataset = saved if saved in list_datasets() else FALLBACK_DATASET
    if args.drop_path is not None and not args.arch.startswith("efficientnet"):
        raise ValueError(f"--drop-path: --arch {args.arch} has no stochastic depth (efficientnet_* archs only)")


def build_data(args: argparse.Namespace, env: DistEnv) -> Loaders:
    cfg = DataConfig(
        backend=args.data_backend,
        dataset=args.dataset,
        root=args.data,
        batch_size=args.batch_size,
        val_batch_size=args.val_batch_size,
        train_subset=args.train_subset,
        val_subset=args.val_subset,
        workers=args.workers,
        image_size=args.image_size,
        num_classes=args.num_classes,
        rank=env.rank,
        world_size=env.world_size,
        seed=args.seed,
        device=env.device,
        memory_format=args.memory_format,
        augmentation=args.augmentation,
        interpolation=args.interpolation,
    )
    if args.data_backend == "synthetic" and env.is_main and cfg.augmentation != "none":
        import sys

        print(f"main.py: note: --data-backend synthetic has no images to augment; --augmentation {cfg.augmentation} "
              "is not applied", file=sys.stderr, flush=True)
    return build_loaders(cfg)


def build_network(args: argparse.Namespace, conv: str, loaders: Loaders, env: DistEnv) -> nn.Module:
    from image_classification.models import build_model, to_channels_last

    model = build_model(
        args.arch,
        conv=conv,
        placement=args.placement,
        num_classes=args.num_classes or loaders.num_classes,
        in_chans=loaders.in_chans,
        init=args.model_config,
        dropout=args.dropout,
        **({"stochastic_depth_prob": args.drop_path} if args.drop_path is not None else {}),
    )
    if args.bn_momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = args.bn_momentum
    model = model.to(env.device)
    if args.memory_format == "nhwc":
        model = to_channels_last(model)
    return model


def tune_paths(args: argparse.Namespace, model: nn.Module, loaders: Loaders, env: DistEnv) -> None:
    """PEDConv ``path=auto``: time every layer's exact paths for the train and validation batch shapes now
    (not inside the first timed steps or a compiled trace), within ``--autotune-budget`` seconds, after
    adopting what the path caches (the workspace's, then the user's) hold for this machine; then rank 0's
    choices on every DDP rank. Reads the disk only: :func:`save_tuned_paths` writes the caches."""
    from image_classification.dynamic import auto_path_layers, autotune

    autotune.set_autotune(None)  # PEDCONV_AUTOTUNE=0 in the environment switches it off too
    autotune.set_autotune(args.autotune and not args.deterministic and autotune.autotune_enabled())
    autotune.set_budget(args.autotune_budget)
    layers = auto_path_layers(model)
    if not layers:
        return
    if autotune.autotune_enabled():
        for path in path_cache_files(args, env):
            autotune.load_cache_file(path, env.device)
    size = (loaders.in_chans, loaders.image_size, loaders.image_size)
    amp = torch.autocast(env.device.type, dtype=_AMP_DTYPES[args.amp_dtype]) if args.amp else None
    said = ("main.py: {signal} received while tuning PEDConv paths; nothing trained or written yet, so nothing to "
            "save") if env.is_main else ""
    # a signal here stops at once in one line (it was a KeyboardInterrupt traceback, or a silent exit 143)
    with GracefulShutdown() as shutdown, shutdown.nothing_to_save(exit_message=said), \
            amp if amp is not None else contextlib.nullcontext():
        autotune.prepare_model(model, None if args.evaluate else (args.batch_size, *size),
                               (args.val_batch_size or args.batch_size, *size), env.device,
                               channels_last=args.memory_format == "nhwc", layers=layers, show=env.is_main)
    autotune.broadcast_cache()


#: the PEDConv path cache's file name in a workspace (the user-level one is autotune.default_cache_file())
WORKSPACE_PATH_CACHE = "pedconv_paths.json"


def path_cache_files(args: argparse.Namespace, env: DistEnv) -> List[str]:
    """Where PEDConv path choices are kept: the workspace's file, then the user's cache file."""
    from image_classification.dynamic import autotune

    return [os.path.join(args.workspace, WORKSPACE_PATH_CACHE), str(autotune.default_cache_file(env.device))]


def save_tuned_paths(args: argparse.Namespace, model: nn.Module, env: DistEnv) -> None:
    """Rank 0: write the timed path choices to the workspace's and the user's path cache (no-op without
    auto-path layers or with tuning off)."""
    from image_classification.dynamic import autotune, has_auto_paths

    if env.is_main and autotune.autotune_enabled() and has_auto_paths(model):
        for path in path_cache_files(args, env):
            autotune.save_cache_file(path, env.device)


def loop_config(args: argparse.Namespace, env: DistEnv) -> LoopConfig:
    return LoopConfig(
        device=env.device,
        accumulation=args.optimizer_batch_size // (args.batch_size * env.world_size),
        amp_dtype=_AMP_DTYPES[args.amp_dtype] if args.amp else None,
        channels_last=args.memory_format == "nhwc",
        infomax_weight=args.infomax_weight,
        prof=args.prof,
        print_freq=args.print_freq,
        is_main=env.is_main,
        world_size=env.world_size,
    )


def _grad_scaler(args: argparse.Namespace, env: DistEnv) -> Optional[torch.amp.GradScaler]:
    if not (args.amp and args.amp_dtype == "fp16"):
        return None
    if args.static_loss_scale is not None and not args.dynamic_loss_scale:
        # as DeepLearningExamples: the scale never grows (it still halves on an overflow, skipping that step)
        return torch.amp.GradScaler(env.device.type, init_scale=args.static_loss_scale, growth_interval=2**31 - 1)
    init = args.static_loss_scale if args.static_loss_scale is not None else 2.0**16
    return torch.amp.GradScaler(env.device.type, init_scale=init)


def build_training_setup(args: argparse.Namespace, model: nn.Module, loaders: Loaders, env: DistEnv,
                         cfg: LoopConfig) -> TrainingSetup:
    """Optimizer, scheduler (per optimizer step), scaler, EMA, mixup and the DDP wrapper."""
    from torch.nn.parallel import DistributedDataParallel

    from .adversarial import build_free_adversarial_training

    optimizer = optimizer_from_args(model, args)
    adversary = build_free_adversarial_training(args, loaders, cfg)
    steps_per_epoch = math.ceil(cfg.iterations(len(loaders.train)) / cfg.accumulation)
    if adversary is not None:  # every replay is an optimizer step: the schedule counts them all
        steps_per_epoch *= adversary.replays
    scheduler = build_scheduler(optimizer, args, max(1, steps_per_epoch))
    ema = None
    if args.use_ema is not None:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.use_ema), use_buffers=True)
    mixup = None
    num_classes = args.num_classes or loaders.num_classes
    if args.mixup > 0:
        from torchvision.transforms import v2

        mixup = v2.MixUp(alpha=args.mixup, num_classes=num_classes)
    if args.compile:
        # in place (nn.Module.compile): state_dict keys stay plain; the EMA copy (made above) gets its own
        backend = args.compile_backend
        model.compile(backend=backend, dynamic=False)
        if ema is not None:
            ema.module.compile(backend=backend, dynamic=False)
    wrapped = model
    if env.distributed:
        align_gradient_strides(model)
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    return TrainingSetup(wrapped, model, criterion, optimizer, scheduler, _grad_scaler(args, env), ema, mixup,
                      adversary)


@dataclass
class RunState:
    """Where the run stands: completed epochs, iterations done in the next one, best top-1."""

    epoch: int = 0
    step_in_epoch: int = 0
    best_prec1: float = -1.0  # -1: nothing validated yet
    pending_validation: bool = False  # the checkpoint was written before its epoch was validated
    #: the interrupted epoch's totals up to ``step_in_epoch`` (engine.EpochResult.totals), None when unknown
    epoch_totals: Optional[Dict[str, float]] = None


def restore_training_state(comp: TrainingSetup, checkpoint: Dict[str, Any], env: DistEnv,
                           accumulation: int = 1, training: bool = True) -> RunState:
    """Optimizer, scheduler, scaler and EMA from a ``--resume`` checkpoint (weights are loaded already).

    The optimizer's momentum buffers come from the checkpoint, its hyperparameters (lr, momentum, weight
    decay, Nesterov) and the learning-rate schedule from the current flags, positioned at the checkpoint's
    (epoch, iteration) -- as DeepLearningExamples does -- so ``--epochs``/``--lr``/``--lr-schedule`` given
    on resume are what the run trains with (and what the raport records). With free adversarial training
    every replay counts as an optimizer step, and each rank gets its own perturbation back. A run that will
    train (``training``) must use the checkpoint's ``--optimizer``.
    """
    state = checkpoint_position(checkpoint)
    saved_args = recorded_args(checkpoint)
    trained_with = str(saved_args.get("optimizer") or "sgd")
    if training and trained_with != optimizer_name(comp.optimizer):
        raise CheckpointError(f"--resume: the checkpoint was trained with --optimizer {trained_with}, "
                              f"this run asks for --optimizer {optimizer_name(comp.optimizer)} "
                              "(its state cannot be carried over): "
                              f"resume with --optimizer {trained_with}, or start a new run from its weights with "
                              "--pretrained-weights")
    replays = comp.adversary.replays if comp.adversary is not None else 1
    try:
        current = [{k: v for k, v in group.items() if k != "params"} for group in comp.optimizer.param_groups]
        comp.optimizer.load_state_dict(checkpoint["optimizer"])
        for group, values in zip(comp.optimizer.param_groups, current):
            group.update(values)
        schedule = cast(LRSchedule, comp.scheduler.lr_lambdas[0])  # build_scheduler's lambda is an LRSchedule
        steps = state.epoch * schedule.steps_per_epoch + (state.step_in_epoch // max(1, accumulation)) * replays
        set_schedule_position(comp.scheduler, steps)
        if comp.scaler is not None and checkpoint.get("scaler"):
            comp.scaler.load_state_dict(checkpoint["scaler"])
        if comp.ema is not None:
            if checkpoint.get("ema") is None:
                raise CheckpointError("--use-ema given but the checkpoint has no EMA weights")
            comp.ema.load_state_dict(checkpoint["ema"])
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"--resume: optimizer/scheduler state does not fit this run: {' '.join(str(exc).split())}"
                              ) from None
    if comp.adversary is not None:
        _restore_perturbation(comp.adversary, checkpoint.get("adversarial"), env)
    return state


def _restore_perturbation(adversary: Any, saved: Any, env: DistEnv) -> None:
    """This rank's free-adversarial-training perturbation from the checkpoint; a note when it cannot be."""
    import sys

    per_rank = saved.get("perturbation_per_rank") if isinstance(saved, dict) else None
    if not isinstance(per_rank, (list, tuple)):
        note = "the checkpoint holds no adversarial perturbation (trained without --adv-train free)"
    elif len(per_rank) != env.world_size:
        note = f"the checkpoint holds the adversarial perturbations of {len(per_rank)} rank(s), this run has " \
               f"{env.world_size}"
    else:
        note = adversary.load_perturbation(per_rank[env.rank])
    if note is not None and env.is_main:
        print(f"main.py: note: {note}; free adversarial training continues from a zero perturbation",
              file=sys.stderr, flush=True)


def set_schedule_position(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> None:
    """Put a freshly built LambdaLR ``steps`` optimizer steps into its schedule (lr of step ``steps``)."""
    scheduler.last_epoch = int(steps)
    lrs = [base * fn(int(steps)) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports


def _count(checkpoint: Dict[str, Any], key: str, default: Optional[int] = None) -> int:
    value = checkpoint.get(key, default)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise CheckpointError(f"--resume: checkpoint field {key!r} must be a non-negative integer, got {value!r}")
    return int(value)


def checkpoint_position(checkpoint: Dict[str, Any]) -> RunState:
    """Completed epochs, iterations into the next one, best top-1 and pending validation of a checkpoint;
    malformed fields are a one-line :class:`CheckpointError`."""
    epoch = _count(checkpoint, "epoch")
    step = _count(checkpoint, "step_in_epoch", 0)
    best = checkpoint.get("best_prec1")
    if isinstance(best, torch.Tensor) and best.numel() == 1:
        best = best.item()
    if best is None:
        best = -1.0
    if isinstance(best, bool) or not isinstance(best, numbers.Real) or math.isnan(float(best)):
        raise CheckpointError(f"--resume: checkpoint field 'best_prec1' must be a number, got {best!r}")
    return RunState(epoch, step, float(best), bool(checkpoint.get("pending_validation", False)),
                    _epoch_totals(checkpoint.get("epoch_totals")) if step else None)


_TOTALS_KEYS = ("loss_sum", "infomax_sum", "correct", "samples", "data_time", "compute_time", "batches")


def _epoch_totals(value: Any) -> Optional[Dict[str, float]]:
    """A mid-epoch checkpoint's ``epoch_totals`` as floats; None (the summary then covers the resumed
    iterations only) when absent, as in checkpoints of earlier versions."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != set(_TOTALS_KEYS) or not all(
            isinstance(value[k], numbers.Real) and not isinstance(value[k], bool) for k in _TOTALS_KEYS):
        raise CheckpointError(f"--resume: checkpoint field 'epoch_totals' must map {', '.join(_TOTALS_KEYS)} to "
                              f"numbers, got {str(value)[:120]}")
    return {k: float(value[k]) for k in _TOTALS_KEYS}


def check_resume_position(checkpoint: Dict[str, Any], state: RunState, args: argparse.Namespace, env: DistEnv,
                          iterations: int) -> None:
    """A checkpoint written part-way through an epoch continues at its iteration only with the same batch per
    process and the same number of processes (the data order of the epoch's rest depends on both), and only
    if that iteration lies inside the epoch (``iterations`` = iterations of a full epoch of this run)."""
    if not state.step_in_epoch:
        return
    saved = recorded_args(checkpoint)
    now = {**vars(args), "dataset": args.dataset or saved.get("dataset")}
    changed = [f"--{key.replace('_', '-')} {_effective(key, saved)} -> {_effective(key, now)}"
               for key in MID_EPOCH_FLAGS if key in saved and _effective(key, saved) != _effective(key, now)]
    if changed:
        raise CheckpointError(
            f"--resume: the checkpoint stopped part-way through epoch {state.epoch} (iteration {state.step_in_epoch}), "
            f"and this run changes what the rest of the epoch reads ({'; '.join(changed)}): resume with the "
            "checkpoint's values to finish the epoch (they may change at an epoch boundary)")
    if state.step_in_epoch >= iterations:
        raise CheckpointError(f"--resume: checkpoint field 'step_in_epoch' is {state.step_in_epoch}, but epoch "
                              f"{state.epoch} has only {iterations} iteration(s) at -b {args.batch_size}")
    per_rank = checkpoint.get("rng_per_rank")
    old_world = checkpoint.get("world_size", len(per_rank) if isinstance(per_rank, (list, tuple)) else None)
    old_batch = saved.get("batch_size")
    if old_batch is None or old_world is None:
        return  # an older checkpoint: nothing to compare
    if (int(old_batch), int(old_world)) != (args.batch_size, env.world_size):
        done = state.step_in_epoch * int(old_batch) * int(old_world)
        raise CheckpointError(
            f"--resume: the checkpoint stopped epoch {state.epoch} after {state.step_in_epoch} iterations of "
            f"-b {old_batch} on {old_world} process(es) ({done} images); this run has -b {args.batch_size} on "
            f"{env.world_size}, which would continue at another image: resume with -b {old_batch} on {old_world} "
            "process(es) to finish the epoch (the batch size may change at the next resume, at an epoch boundary)")


def _effective(key: str, values: Dict[str, Any]) -> Any:
    """A recorded or given flag as the run uses it: ``--image-size`` left unset is the dataset's own size (an unset
    size and an explicit 28 on Fashion-MNIST are the same run; 'None -> 32' told nothing)."""
    value = values.get(key)
    if key == "image_size" and value is None:
        from image_classification.data import DATASETS

        dataset = values.get("dataset")
        return DATASETS[dataset].image_size if dataset in DATASETS else None
    return value


# flags that decide which images the rest of an interrupted epoch reads, and how: a mid-epoch resume refuses a change
MID_EPOCH_FLAGS = ("seed", "train_subset", "image_size", "dataset", "data_backend", "augmentation", "interpolation")

def changed_flags(saved: Any, args: argparse.Namespace) -> List[str]:
    """``--flag OLD -> NEW`` for every training flag that differs from the checkpoint's recorded arguments."""
    if not isinstance(saved, dict):
        return []
    changes = []
    for key in training_flags():
        if key in saved and hasattr(args, key) and saved[key] != getattr(args, key):
            changes.append(f"--{key.replace('_', '-')} {saved[key]} -> {getattr(args, key)}")
    return changes


def load_weights(model: nn.Module, checkpoint: Dict[str, Any], args: argparse.Namespace, conv: str, path: str) -> None:
    """Model weights from a loaded checkpoint; errors name the file and the mismatching arch/operator/keys."""
    try:
        _refuse_non_finite(checkpoint)
        load_model_weights(model, checkpoint, expected_arch=args.arch, expected_conv=conv)
    except CheckpointError as exc:
        message = str(exc)
        if message.startswith("checkpoint"):
            message = message[len("checkpoint"):].lstrip(" :")
        raise CheckpointError(f"checkpoint {path}: {message}") from None


def _refuse_non_finite(checkpoint: Dict[str, Any]) -> None:
    """Weights holding NaN/inf come from a diverged run: training or evaluating them only spreads them."""
    bad = []
    for part in ("state_dict", "ema"):
        tensors = checkpoint.get(part)
        if not isinstance(tensors, dict):
            continue
        for key, value in tensors.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                bad.append(key if part == "state_dict" else f"ema:{key}")
    if bad:
        shown = ", ".join(bad[:3]) + (f", ... {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(
            f"checkpoint holds non-finite values (NaN/inf) in {len(bad)} tensor(s) ({shown}): it comes from a "
            "diverged run; use an earlier checkpoint (--gather-checkpoints keeps them) or start again"
        )
