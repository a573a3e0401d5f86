"""SGD with weight-decay exclusions and the per-iteration learning-rate schedule.

The schedule is a :class:`torch.optim.lr_scheduler.LambdaLR` stepped once per *optimizer* step (after
gradient accumulation): linear warmup over ``warmup_epochs`` then ``step`` / ``linear`` / ``cosine`` decay,
as in DeepLearningExamples' ``lr_step_policy`` / ``lr_linear_policy`` / ``lr_cosine_policy`` but with the
warmup and decay resolved per iteration instead of per epoch.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["parameter_groups", "build_optimizer", "LRSchedule", "build_scheduler"]

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def parameter_groups(model: nn.Module, weight_decay: float, bn_weight_decay: bool = False) -> List[Dict]:
    """Two groups: decayed weights, and normalisation parameters + biases without weight decay.

    With ``bn_weight_decay`` every parameter is decayed (one group).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if bn_weight_decay:
        return [{"params": params, "weight_decay": weight_decay}]
    no_decay_ids = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, _NORM_TYPES) or name == "bias" or name.endswith("_bias"):
                no_decay_ids.add(id(param))
    decay = [p for p in params if id(p) not in no_decay_ids]
    no_decay = [p for p in params if id(p) in no_decay_ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module, lr: float, momentum: float, weight_decay: float, nesterov: bool = False, bn_weight_decay: bool = False
) -> torch.optim.SGD:
    """SGD with momentum; BN/bias parameters excluded from weight decay unless ``bn_weight_decay``."""
    if nesterov and momentum <= 0:
        raise ValueError("--nesterov needs a positive --mom")
    groups = [g for g in parameter_groups(model, weight_decay, bn_weight_decay) if g["params"]]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


class LRSchedule:
    """Multiplier of the peak lr at optimizer step ``t`` (a picklable callable for LambdaLR).

    Warmup: ``(t + 1) / warmup_steps`` for ``t < warmup_steps``. Then, with ``e`` the fraction of the
    post-warmup steps done: ``step``: ``decay ** #{milestones <= epoch}``; ``linear``: ``1 - e``;
    ``cosine``: ``(1 + cos(pi e)) / 2``; linear/cosine end at ``end_lr / lr`` instead of 0.
    """

    def __init__(
        self,
        policy: str,
        steps_per_epoch: int,
        epochs: int,
        warmup_epochs: int = 0,
        milestones: Sequence[int] = (30, 60, 80),
        decay: float = 0.1,
        end_ratio: float = 0.0,
    ) -> None:
        if policy not in ("step", "linear", "cosine"):
            raise ValueError(f"unknown lr schedule {policy!r}; valid: step, linear, cosine")
        if steps_per_epoch < 1 or epochs < 1:
            raise ValueError(f"lr schedule needs >= 1 step per epoch and >= 1 epoch, got {steps_per_epoch}, {epochs}")
        self.policy = policy
        self.steps_per_epoch = int(steps_per_epoch)
        self.total_steps = int(epochs) * self.steps_per_epoch
        self.warmup_steps = int(warmup_epochs) * self.steps_per_epoch
        self.milestones = sorted(int(m) for m in milestones)
        self.decay = float(decay)
        self.end_ratio = float(end_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.policy == "step":
            epoch = step // self.steps_per_epoch
            return self.decay ** sum(1 for m in self.milestones if epoch >= m)
        span = max(1, self.total_steps - self.warmup_steps)
        done = min(1.0, (step - self.warmup_steps) / span)
        shape = 1.0 - done if self.policy == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))
        return self.end_ratio + (1.0 - self.end_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, args, steps_per_epoch: int) -> LambdaLR:
    """LambdaLR driven by :class:`LRSchedule` from the parsed arguments (stepped per optimizer step)."""
    end_ratio = args.end_lr / args.lr if args.lr > 0 else 0.0
    schedule = LRSchedule(
        args.lr_schedule, steps_per_epoch, args.epochs, args.warmup, args.lr_steps, args.lr_decay, end_ratio
    )
    return LambdaLR(optimizer, schedule)
