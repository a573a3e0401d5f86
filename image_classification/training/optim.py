"""Optimizers (SGD, TF-style RMSProp, AdamW) with weight-decay exclusions, their command-line flags (one group that
``main.py`` and the dense tasks share: :func:`add_optimizer_flags`, :func:`check_optimizer_flags`,
:func:`optimizer_from_args`), and the per-iteration learning-rate schedule.

The schedule is a :class:`torch.optim.lr_scheduler.LambdaLR` stepped once per *optimizer* step (after
gradient accumulation; every replay of free adversarial training is one): linear warmup over
``warmup_epochs`` then ``step`` / ``linear`` / ``cosine`` decay, as in DeepLearningExamples'
``lr_step_policy`` / ``lr_linear_policy`` / ``lr_cosine_policy`` but with the warmup and decay resolved per
iteration instead of per epoch, or ``exponential``: ``decay ** floor(step / (decay_epochs x steps per
epoch))`` counted from the first step, as EfficientNet's staircase ``exponential_decay`` (0.97 every 2.4
epochs; the warmup replaces the first epochs' values).
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, cast

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

from image_classification.argparsing import non_negative_float, positive_float, probability

__all__ = ["parameter_groups", "build_optimizer", "RMSpropTF", "OPTIMIZERS", "DEFAULT_EPS", "optimizer_name",
           "LRSchedule", "build_scheduler", "LR_SCHEDULES", "OPTIMIZER_GROUP", "add_optimizer_flags",
           "check_optimizer_flags", "optimizer_from_args"]

LR_SCHEDULES = ("step", "linear", "cosine", "exponential")
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


OPTIMIZERS = ("sgd", "rmsprop", "adamw")
DEFAULT_EPS = {"rmsprop": 1e-3, "adamw": 1e-8}  # EfficientNet's RMSProp epsilon; torch's AdamW default


class RMSpropTF(torch.optim.Optimizer):
    r"""RMSProp as TensorFlow 1 implements it (``tf.train.RMSPropOptimizer``), which EfficientNet trains with.

    For every parameter ``p`` with gradient ``g`` (plus ``weight_decay * p``, the gradient of TF's
    ``weight_decay * ||p||^2 / 2`` loss term), with ``ms`` initialised to **ones** and ``mom`` to zeros:

    .. math::
        ms &\leftarrow \alpha\, ms + (1 - \alpha)\, g^2 \\
        mom &\leftarrow \mu\, mom + lr\, g / \sqrt{ms + \epsilon} \\
        p &\leftarrow p - mom

    It differs from :class:`torch.optim.RMSprop` in three ways that torch's class cannot express: epsilon
    inside the square root (EfficientNet's 1e-3 matters: it bounds the step of rarely updated weights), the
    mean square starting at one instead of zero (no huge first steps), and the learning rate applied inside
    the momentum buffer (a change of lr affects new gradients only).
    """

    def __init__(self, params: Iterable, lr: float = 0.016, alpha: float = 0.9, eps: float = 1e-3,
                 momentum: float = 0.9, weight_decay: float = 0.0, foreach: Optional[bool] = None) -> None:
        if lr < 0 or not 0.0 <= alpha < 1.0 or eps < 0 or not 0.0 <= momentum < 1.0 or weight_decay < 0:
            raise ValueError(f"RMSpropTF: invalid lr {lr}, alpha {alpha}, eps {eps}, momentum {momentum} or "
                             f"weight decay {weight_decay}")
        defaults = dict(lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch.optim.Optimizer's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, squares, buffers = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("RMSpropTF does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["square_avg"] = torch.ones_like(p, memory_format=torch.preserve_format)
                    if group["momentum"] > 0:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                squares.append(state["square_avg"])
                buffers.append(state.get("momentum_buffer"))
            if params:
                foreach = group["foreach"]
                if foreach is None:
                    foreach = all(p.is_cuda for p in params) and len({(p.device, p.dtype) for p in params}) == 1
                (self._foreach_update if foreach else self._single_update)(params, grads, squares, buffers, group)
        return loss

    @staticmethod
    def _single_update(params: List[torch.Tensor], grads: List[torch.Tensor], squares: List[torch.Tensor],
                       buffers: List[Optional[torch.Tensor]], group: Dict) -> None:
        lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
        momentum, wd = group["momentum"], group["weight_decay"]
        for p, g, ms, buf in zip(params, grads, squares, buffers):
            if wd:
                g = g.add(p, alpha=wd)
            ms.mul_(alpha).addcmul_(g, g, value=1.0 - alpha)
            rms = ms.add(eps).sqrt_()
            if buf is not None:
                buf.mul_(momentum).addcdiv_(g, rms, value=lr)
                p.sub_(buf)
            else:
                p.addcdiv_(g, rms, value=-lr)

    @staticmethod
    def _foreach_update(params: List[torch.Tensor], grads: List[torch.Tensor], squares: List[torch.Tensor],
                        buffers: List[Optional[torch.Tensor]], group: Dict) -> None:
        """The same update with torch's multi-tensor kernels (a few launches per group instead of per tensor)."""
        lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
        momentum, wd = group["momentum"], group["weight_decay"]
        if wd:
            grads = list(torch._foreach_add(grads, params, alpha=wd))
        torch._foreach_mul_(squares, alpha)
        torch._foreach_addcmul_(squares, grads, grads, value=1.0 - alpha)
        rms = torch._foreach_add(squares, eps)
        torch._foreach_sqrt_(rms)
        if buffers and buffers[0] is not None:
            momenta = cast(List[torch.Tensor], buffers)  # made together: all set when the first is
            torch._foreach_mul_(momenta, momentum)
            torch._foreach_addcdiv_(momenta, grads, rms, value=lr)
            torch._foreach_sub_(params, momenta)
        else:
            torch._foreach_addcdiv_(params, grads, rms, value=-lr)


def build_optimizer(
    model: nn.Module, lr: float, momentum: float, weight_decay: float, nesterov: bool = False,
    bn_weight_decay: bool = False, optimizer: str = "sgd", eps: Optional[float] = None, alpha: float = 0.9,
) -> torch.optim.Optimizer:
    """The ``optimizer`` over ``model``; BN/bias parameters excluded from weight decay unless ``bn_weight_decay``.

    ``sgd``: SGD with ``momentum`` (``nesterov``), weight decay as an L2 gradient term. ``rmsprop``:
    :class:`RMSpropTF` (``alpha`` = TF's decay, ``momentum``, ``eps`` inside the square root, default 1e-3),
    weight decay as an L2 gradient term (EfficientNet's L2 loss). ``adamw``: :class:`torch.optim.AdamW`
    (betas 0.9/0.999, ``eps`` default 1e-8) with decoupled weight decay; ``momentum`` is not used.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    problem = _nesterov_problem(optimizer, momentum, nesterov)
    if problem is not None:
        raise ValueError(problem)
    groups = [g for g in parameter_groups(model, weight_decay, bn_weight_decay) if g["params"]]
    if optimizer == "rmsprop":
        return RMSpropTF(groups, lr=lr, alpha=alpha, eps=DEFAULT_EPS[optimizer] if eps is None else eps,
                         momentum=momentum)
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, eps=DEFAULT_EPS[optimizer] if eps is None else eps)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


def _nesterov_problem(optimizer: str, momentum: float, nesterov: bool) -> Optional[str]:
    """Why ``--nesterov`` cannot apply, or None (the one place this rule is written)."""
    if nesterov and optimizer != "sgd":
        return f"--nesterov is an SGD option; --optimizer {optimizer} has no Nesterov variant"
    if nesterov and momentum <= 0:
        return "--nesterov needs a positive --mom"
    return None


#: the title of the optimizer flag group (``--help`` shows it; ``main.py`` derives its resume check from it)
OPTIMIZER_GROUP = "optimizer"


def add_optimizer_flags(parser: argparse.ArgumentParser, *, lr: float = 0.1, weight_decay: float = 1e-4
                        ) -> argparse._ArgumentGroup:
    """The optimizer flags ``main.py`` and the dense tasks share, with their types (each value checked where it is
    read). Adding an optimizer flag: add it here, use it in :func:`optimizer_from_args` (and, if it constrains
    another flag, in :func:`check_optimizer_flags`), document it in docs/training.md."""
    group = parser.add_argument_group(OPTIMIZER_GROUP)
    group.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS,
                       help="sgd (momentum --mom, --nesterov); rmsprop: RMSProp as TensorFlow and EfficientNet "
                       "(epsilon inside the square root, mean square starting at 1, lr inside the momentum); "
                       "adamw: torch's AdamW with decoupled --wd (default: sgd)")
    group.add_argument("--lr", type=non_negative_float, default=lr, help=f"peak learning rate (default: {lr:g})")
    group.add_argument("--mom", "--momentum", dest="momentum", type=non_negative_float, default=0.9,
                       help="SGD / RMSProp momentum, in [0, 1) (default: 0.9)")
    group.add_argument("--wd", "--weight-decay", dest="weight_decay", type=non_negative_float, default=weight_decay,
                       help=f"weight decay (default: {weight_decay:g})")
    group.add_argument("--bn-weight-decay", action="store_true",
                       help="also decay BatchNorm and bias parameters (default: they are excluded)")
    group.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD)")
    group.add_argument("--optimizer-eps", type=positive_float, default=None, metavar="EPS",
                       help="epsilon of rmsprop (default: 1e-3, EfficientNet's) or adamw (default: 1e-8)")
    group.add_argument("--rmsprop-alpha", type=probability, default=None, metavar="ALPHA",
                       help="rmsprop: decay of the mean square gradient (TF's 'decay'; default: 0.9)")
    return group


def check_optimizer_flags(args: argparse.Namespace, typed: Callable[[str], bool] = lambda dest: True) -> None:
    """Raise ValueError (one line) for optimizer flags that cannot work together; fill the defaults that depend on
    ``--optimizer``. ``typed(dest)``: whether the flag was given on the command line; a flag of another optimizer
    that only a recipe set is dropped instead (the command line switched the optimizer)."""
    if not 0.0 <= args.momentum < 1.0:
        raise ValueError(f"--mom must be in [0, 1), got {args.momentum}")
    problem = _nesterov_problem(args.optimizer, args.momentum, args.nesterov)
    if problem is not None:
        raise ValueError(problem)
    for dest, needs, applies in (("optimizer_eps", "--optimizer rmsprop or adamw", args.optimizer != "sgd"),
                                 ("rmsprop_alpha", "--optimizer rmsprop", args.optimizer == "rmsprop")):
        if not applies and getattr(args, dest) is not None:
            if typed(dest):
                raise ValueError(f"--{dest.replace('_', '-')} without {needs}")
            setattr(args, dest, None)
    if args.optimizer == "rmsprop" and args.rmsprop_alpha is None:
        args.rmsprop_alpha = 0.9


def optimizer_from_args(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """:func:`build_optimizer` from the flags of :func:`add_optimizer_flags` (checked by
    :func:`check_optimizer_flags`)."""
    return build_optimizer(model, args.lr, args.momentum, args.weight_decay, args.nesterov, args.bn_weight_decay,
                           optimizer=args.optimizer, eps=args.optimizer_eps, alpha=args.rmsprop_alpha or 0.9)


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """``sgd`` / ``rmsprop`` / ``adamw``: the ``--optimizer`` that built ``optimizer``."""
    if isinstance(optimizer, RMSpropTF):
        return "rmsprop"
    if isinstance(optimizer, torch.optim.AdamW):
        return "adamw"
    return "sgd"


class LRSchedule:
    """Multiplier of the peak lr at optimizer step ``t`` (a picklable callable for LambdaLR).

    Warmup: ``(t + 1) / warmup_steps`` for ``t < warmup_steps``. Then, with ``e`` the fraction of the
    post-warmup steps done: ``step``: ``decay ** #{milestones <= epoch}``; ``linear``: ``1 - e``;
    ``cosine``: ``(1 + cos(pi e)) / 2``; linear/cosine end at ``end_lr / lr`` instead of 0;
    ``exponential``: ``decay ** floor(t / (decay_epochs * steps_per_epoch))``, ``t`` counted from the first
    step (TF's staircase ``exponential_decay`` as EfficientNet uses it).
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
        decay_epochs: float = 0.0,
    ) -> None:
        if policy not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule {policy!r}; valid: {', '.join(LR_SCHEDULES)}")
        if steps_per_epoch < 1 or epochs < 1:
            raise ValueError(f"lr schedule needs >= 1 step per epoch and >= 1 epoch, got {steps_per_epoch}, {epochs}")
        if policy == "exponential" and not decay_epochs > 0:
            raise ValueError(f"the exponential lr schedule needs decay epochs > 0, got {decay_epochs}")
        self.policy = policy
        self.steps_per_epoch = int(steps_per_epoch)
        self.total_steps = int(epochs) * self.steps_per_epoch
        self.warmup_steps = int(warmup_epochs) * self.steps_per_epoch
        self.milestones = sorted(int(m) for m in milestones)
        self.decay = float(decay)
        self.end_ratio = float(end_ratio)
        self.decay_steps = float(decay_epochs) * self.steps_per_epoch

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.policy == "exponential":
            return self.decay ** math.floor(step / self.decay_steps)
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
        args.lr_schedule, steps_per_epoch, args.epochs, args.warmup, args.lr_steps, args.lr_decay, end_ratio,
        args.lr_decay_epochs or 0.0,
    )
    return LambdaLR(optimizer, schedule)
