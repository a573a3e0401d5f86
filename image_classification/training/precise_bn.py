"""Precise BatchNorm statistics: the true average over N training batches instead of the running EMA.

BatchNorm's running statistics are an exponential moving average (momentum 0.1) that starts from mean 0 /
variance 1. When a layer's real variance is far from 1 -- PEDConv's outputs start about 8x smaller than a
static conv's, a product of three sigmoids near 0.5 -- the initial value dominates ``running_var`` for
dozens of iterations (0.9^46 = 0.008 after a 46-iteration epoch), so a short run validates with statistics
that do not match the network and looks broken although its weights are fine. An EMA model inherits the
same lag. As in pycls' ``compute_precise_bn_stats`` (Wu & Johnson, "Rethinking 'Batch' in BatchNorm",
2021, Sec. 3), :func:`recompute_bn_statistics` recomputes them:

* every ``_BatchNorm`` with running statistics is reset and set to cumulative averaging
  (``momentum=None``): after N batches ``running_mean`` / ``running_var`` are the plain mean over the
  batches of the per-batch mean / unbiased variance, exactly what training-mode BN normalised with;
* every other module stays in eval mode, so the dynamic operators run without training noise (PEDConv's
  Eq. 5 sampling off, as at validation), dropout is off and no info-max term is recorded; no gradients;
* under DDP each rank averages over its own N batches and the results are averaged over the ranks
  (all ranks see the same number of batches), so every rank ends with identical statistics;
* momentum, ``num_batches_tracked`` and every module's train/eval mode are restored afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, List, Sequence, Tuple

import torch
import torch.nn as nn

from .distributed import all_reduce_mean_

__all__ = ["batchnorm_layers", "recompute_bn_statistics"]


def batchnorm_layers(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics (those precise BN recomputes)."""
    return [
        m for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def _statistics(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(num_batches_tracked, running_mean, running_var) of a layer :func:`batchnorm_layers` returned."""
    tracked, mean, var = bn.num_batches_tracked, bn.running_mean, bn.running_var
    assert tracked is not None and mean is not None and var is not None  # it tracks running statistics
    return tracked, mean, var


@torch.no_grad()
def recompute_bn_statistics(
    models: Sequence[nn.Module],
    batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    num_batches: int,
    prepare=None,
    autocast=None,
    progress=None,
) -> int:
    """Replace the running statistics of every BatchNorm of ``models`` by their average over the first
    ``num_batches`` image batches of ``batches``; returns the number of batches used.

    ``prepare(images, targets) -> (images, targets)`` moves a batch to the device (default: as is);
    ``autocast()`` returns the forward's autocast context (the run's ``--amp``); ``progress(i)`` is
    called after each batch. All models see the same batches (one pass over the data). Under DDP
    every rank must call this with the same ``num_batches`` and as many batches available.
    """
    layers = [batchnorm_layers(model) for model in models]
    if num_batches < 1 or not any(layers):
        return 0
    modes = [[(m, m.training) for m in model.modules()] for model in models]
    saved = []
    for group in layers:
        for bn in group:
            tracked, mean, var = _statistics(bn)
            saved.append((bn, bn.momentum, tracked.clone(), mean.clone(), var.clone()))
    used = 0
    try:
        for model, group in zip(models, layers):
            model.eval()
            for bn in group:
                bn.reset_running_stats()
                bn.momentum = None  # cumulative moving average: equal weight for every batch
                bn.train()
        for images, targets in batches:
            if used >= num_batches:
                break
            if prepare is not None:
                images, targets = prepare(images, targets)
            for model in models:
                with autocast() if autocast is not None else contextlib.nullcontext():
                    model(images)
            used += 1
            if progress is not None:
                progress(used)
        for group in layers:
            for bn in group:
                _, running_mean, running_var = _statistics(bn)
                all_reduce_mean_(running_mean)
                all_reduce_mean_(running_var)
    except BaseException:
        used = 0  # a failure part-way: keep the statistics the models had
        raise
    finally:
        for bn, momentum, tracked, mean, var in saved:
            bn.momentum = momentum
            num_batches_tracked, running_mean, running_var = _statistics(bn)
            num_batches_tracked.copy_(tracked)
            if used == 0:
                running_mean.copy_(mean)
                running_var.copy_(var)
        for states in modes:
            for module, training in states:
                module.training = training
    return used
