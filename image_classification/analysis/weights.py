"""How much each dynamic layer's per-sample effective weight W(x) actually varies across inputs.

For every dynamic layer with a per-sample weight (PEDConv Eq. 2 / Appendix E, DCD Eq. 6-9, DY-Conv and
CondConv aggregation, DCD's classifier) over validation images x:

* ``relative_variation = sqrt(sum_ij Var_x W_ij(x)) / ||E_x W(x)||_F``: the RMS distance of a sample's weight
  from the mean weight, relative to the mean weight (0: a static layer; 0.1: a sample's weight is 10 % away
  from the average weight);
* ``norm_cv``: the coefficient of variation of ``||W(x)||_F`` over samples (how much of the variation is a mere
  rescaling of the whole kernel).

PEDConv's statistics are computed from its factors without ever forming the B x C_out x C_in x k x k weights:
``sum_b W(x_b) = W_base * sum_b c_b`` and ``sum_b W(x_b)^2 = W_base^2 * sum_b c_b^2`` with ``c_b`` the rank-R
CP tensor (multiplicative; the additive form likewise), both weight-sized sums of outer products. Other
operators use their ``dynamic_weight(x)`` a few samples at a time. The command line is
``python -m image_classification.tools.weight_variation``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Tuple, cast

import torch
import torch.nn as nn

from .common import AnalysisError

__all__ = ["WeightMoments", "collect_weight_variation"]

CHUNK = 4  # samples per dynamic_weight() call for operators without a factored path


@dataclass
class WeightMoments:
    """Per-entry sums over samples of W(x) and W(x)^2 (float64), and the per-sample Frobenius norms."""

    operator: str
    shape: tuple
    count: int = 0
    total: Optional[torch.Tensor] = None
    squares: Optional[torch.Tensor] = None
    norms: Optional[List[float]] = None

    def add(self, total: torch.Tensor, squares: torch.Tensor, norms: torch.Tensor) -> None:
        total, squares = total.double().cpu(), squares.double().cpu()
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.norms = (self.norms or []) + norms.double().cpu().tolist()
        self.count += int(norms.numel())

    def statistics(self) -> Dict[str, float]:
        assert self.total is not None and self.squares is not None and self.norms
        mean = self.total / self.count
        variance = (self.squares / self.count - mean * mean).clamp_min(0.0)
        mean_norm = float(mean.norm())
        norms = torch.tensor(self.norms, dtype=torch.float64)
        return {"relative_variation": math.sqrt(float(variance.sum())) / mean_norm if mean_norm > 0 else float("nan"),
                "norm_cv": float(norms.std(unbiased=False) / norms.mean()) if float(norms.mean()) > 0 else float("nan")}


class _PerSampleWeight(Protocol):
    """A dynamic layer whose ``dynamic_weight(x)`` is one weight per sample (``per_sample_weight``)."""

    def dynamic_weight(self, x: torch.Tensor) -> torch.Tensor: ...


def _generic_sums(module: _PerSampleWeight, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    total: Optional[torch.Tensor] = None
    squares: Optional[torch.Tensor] = None
    norms = []
    for start in range(0, x.shape[0], CHUNK):
        w = module.dynamic_weight(x[start:start + CHUNK]).detach().double()
        total = w.sum(0) if total is None else total + w.sum(0)
        squares = (w * w).sum(0) if squares is None else squares + (w * w).sum(0)
        norms.append(w.flatten(1).norm(dim=1))
    assert total is not None and squares is not None, "an empty batch has no weight moments"
    return total, squares, torch.cat(norms)


def _operator(module: nn.Module) -> str:
    from .coefficients import _operator as op

    return op(module)


def collect_weight_variation(model: nn.Module, batches, device: str = "cpu") -> Dict[str, WeightMoments]:
    """Run ``model`` (eval) over ``batches`` and gather the per-layer weight moments."""
    moments: Dict[str, WeightMoments] = {}
    handles = []

    def hook_for(layer: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            moments_of = getattr(module, "weight_moments", None)
            own = moments_of(x) if callable(moments_of) else None
            # hooked below on layers with a callable dynamic_weight only
            total, squares, norms = own if own is not None else _generic_sums(cast(_PerSampleWeight, module), x)
            entry = moments.setdefault(layer, WeightMoments(_operator(module), tuple(total.shape)))
            entry.add(total, squares, norms)
        return hook

    for name, module in model.named_modules():
        if not name or not callable(getattr(module, "dynamic_weight", None)):
            continue
        if not getattr(module, "per_sample_weight", True):
            continue  # e.g. per-location weights (spatial PEDConv): the coefficient tool covers them
        handles.append(module.register_forward_pre_hook(hook_for(name)))
    if not handles:
        raise AnalysisError(f"{type(model).__name__} has no dynamic layer with a per-sample weight")
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, _ in batches:
                model(images.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was)
    if not moments:
        raise AnalysisError("the validation set yielded no image")
    return moments
