"""Building what a run needs from the parsed arguments: seed, data, model, optimizer state, resume.

Everything here only reads the disk: the workspace is created and written by the trainer afterwards,
so a bad input (``DataError``, ``CheckpointError``, ``ValueError``) leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from image_classification.data import DataConfig, Loaders, build_loaders

from .checkpoint import CheckpointError, load_checkpoint, load_model_weights
from .distributed import DistEnv, broadcast_int
from .engine import Components, LoopConfig
from .optim import build_optimizer, build_scheduler

__all__ = ["seed_everything", "resolve_resume", "infer_conv", "build_data", "build_network", "build_components",
           "loop_config", "RunState", "restore_training_state", "tune_paths"]

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
            return None, None
    if path is None:
        return None, None
    checkpoint = load_checkpoint(path)
    if "epoch" not in checkpoint or "optimizer" not in checkpoint:
        raise CheckpointError(f"--resume {path} holds weights only (no epoch/optimizer state); use --pretrained-weights")
    return path, checkpoint


def infer_conv(args: argparse.Namespace, checkpoint: Optional[Dict[str, Any]]) -> str:
    """``--conv``/``--dynamic`` when given, else the checkpoint's operator, else ``static``.

    The authors' PEDConv checkpoints carry no operator field; their ``.attn.`` keys identify them (their
    README evaluates them without ``--dynamic``).
    """
    if args.conv is not None:
        return args.conv
    if checkpoint is not None:
        if checkpoint.get("conv"):
            return str(checkpoint["conv"])
        if any(".attn.fc_share." in key for key in checkpoint.get("state_dict", {})):
            return "pedconv"
    return "static"


def build_data(args: argparse.Namespace, env: DistEnv) -> Loaders:
    cfg = DataConfig(
        backend=args.data_backend,
        dataset=args.dataset,
        root=args.data,
        batch_size=args.batch_size,
        val_batch_size=args.val_batch_size,
        train_subset=getattr(args, "train_subset", None),
        val_subset=getattr(args, "val_subset", None),
        workers=args.workers,
        image_size=args.image_size,
        num_classes=args.num_classes,
        rank=env.rank,
        world_size=env.world_size,
        seed=args.seed,
        device=env.device,
        memory_format=args.memory_format,
    )
    return build_loaders(cfg)


def build_network(args: argparse.Namespace, conv: str, loaders: Loaders, env: DistEnv) -> nn.Module:
    from image_classification.models import build_model

    model = build_model(
        args.arch,
        conv=conv,
        placement=args.placement,
        num_classes=args.num_classes or loaders.num_classes,
        in_chans=loaders.in_chans,
        init=args.model_config,
        dropout=args.dropout,
    )
    model = model.to(env.device)
    if args.memory_format == "nhwc":
        model = model.to(memory_format=torch.channels_last)
    tune_paths(args, model, loaders, env)
    return model


def tune_paths(args: argparse.Namespace, model: nn.Module, loaders: Loaders, env: DistEnv) -> None:
    """PEDConv ``path=auto``: time every layer's exact paths for the train and validation batch shapes now
    (not inside the first timed steps or a compiled trace) and adopt rank 0's choices on every DDP rank."""
    from image_classification.dynamic import autotune
    from image_classification.dynamic.pedconv import has_auto_paths

    autotune.set_autotune(None)  # PEDCONV_AUTOTUNE=0 in the environment switches it off too
    autotune.set_autotune(bool(getattr(args, "autotune", True)) and not args.deterministic
                          and autotune.autotune_enabled())
    if not has_auto_paths(model):
        return
    size = (loaders.in_chans, loaders.image_size, loaders.image_size)
    amp = torch.autocast(env.device.type, dtype=_AMP_DTYPES[args.amp_dtype]) if args.amp else None
    with amp if amp is not None else contextlib.nullcontext():
        autotune.prepare_model(model, None if args.evaluate else (args.batch_size, *size),
                               (args.val_batch_size or args.batch_size, *size), env.device,
                               channels_last=args.memory_format == "nhwc")
    autotune.broadcast_cache()


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


def build_components(args: argparse.Namespace, model: nn.Module, loaders: Loaders, env: DistEnv,
                     cfg: LoopConfig) -> Components:
    """Optimizer, scheduler (per optimizer step), scaler, EMA, mixup and the DDP wrapper."""
    from torch.nn.parallel import DistributedDataParallel

    optimizer = build_optimizer(model, args.lr, args.momentum, args.weight_decay, args.nesterov, args.bn_weight_decay)
    steps_per_epoch = math.ceil(cfg.iterations(len(loaders.train)) / cfg.accumulation)  # type: ignore[arg-type]
    scheduler = build_scheduler(optimizer, args, max(1, steps_per_epoch))
    ema = None
    if args.use_ema is not None:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.use_ema), use_buffers=True)
    mixup = None
    num_classes = args.num_classes or loaders.num_classes
    if args.mixup > 0:
        from torchvision.transforms import v2

        mixup = v2.MixUp(alpha=args.mixup, num_classes=num_classes)
    if getattr(args, "compile", False):
        # in place (nn.Module.compile): state_dict keys stay plain; the EMA copy (made above) gets its own
        backend = getattr(args, "compile_backend", "inductor")
        model.compile(backend=backend, dynamic=False)
        if ema is not None:
            ema.module.compile(backend=backend, dynamic=False)
    wrapped = model
    if env.distributed:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    return Components(wrapped, model, criterion, optimizer, scheduler, _grad_scaler(args, env), ema, mixup)


@dataclass
class RunState:
    """Where the run stands: completed epochs, iterations done in the next one, best top-1."""

    epoch: int = 0
    step_in_epoch: int = 0
    best_prec1: float = -1.0  # -1: nothing validated yet


def restore_training_state(comp: Components, checkpoint: Dict[str, Any], env: DistEnv) -> RunState:
    """Optimizer, scheduler, scaler and EMA from a ``--resume`` checkpoint (weights are loaded already)."""
    try:
        comp.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scheduler") is not None:
            comp.scheduler.load_state_dict(checkpoint["scheduler"])
        if comp.scaler is not None and checkpoint.get("scaler"):
            comp.scaler.load_state_dict(checkpoint["scaler"])
        if comp.ema is not None:
            if checkpoint.get("ema") is None:
                raise CheckpointError("--use-ema given but the checkpoint has no EMA weights")
            comp.ema.load_state_dict(checkpoint["ema"])
    except (KeyError, ValueError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"--resume: optimizer/scheduler state does not fit this run: {' '.join(str(exc).split())}"
                              ) from None
    best = checkpoint.get("best_prec1")
    return RunState(int(checkpoint["epoch"]), int(checkpoint.get("step_in_epoch", 0)), float(-1.0 if best is None else best))


def load_weights(model: nn.Module, checkpoint: Dict[str, Any], args: argparse.Namespace, conv: str, path: str) -> None:
    """Model weights from a loaded checkpoint; errors name the file and the mismatching arch/operator/keys."""
    try:
        load_model_weights(model, checkpoint, expected_arch=args.arch, expected_conv=conv)
    except CheckpointError as exc:
        message = str(exc)
        if message.startswith("checkpoint"):
            message = message[len("checkpoint"):].lstrip(" :")
        raise CheckpointError(f"checkpoint {path}: {message}") from None
