"""Per-layer variance of the dynamic coefficients over validation images, and their histograms.

DCD (Li et al., ICLR 2021, Sec. 5.4, Fig. 6) checks that the dynamic channel fusion Phi(x) really depends on
the input: ``sigma_Phi = sum_ij sigma_ij / L^2`` with ``sigma_ij`` the variance of entry ``phi_ij(x)`` over
all validation images, normalised per layer by the variance of the layer's input feature map. This tool
computes that statistic for every dynamic layer and every coefficient it generates:

* PEDConv: gamma (C_out), phi (C_in/g), psi (k*k) of Eq. 1-2, post-sigmoid, rank-R components flattened;
  spatial PEDConv: the same with every output location of every image as a sample;
* DCD: Lambda (C_out) and Phi (L x L per block; joint/depthwise forms as generated);
* DY-Conv / CondConv: the kernel attention pi (K).

``sigma = mean over entries of Var_x(entry)``; ``input_var`` is the variance of all input activations of the
layer (over images, channels and positions); ``normalized_sigma = sigma / input_var`` (DCD Fig. 6). In eval
mode PEDConv's coefficients are the deterministic means (no sampling noise), as at inference. The command line is
``python -m image_classification.tools.coefficients``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, cast

import torch
import torch.nn as nn

from .common import AnalysisError

__all__ = ["CoefficientStats", "collect_coefficients", "layer_coefficients"]


@dataclass
class RunningMoments:
    """Per-entry count / sum / sum of squares in float64 (variance over samples), plus min and max."""

    count: int = 0
    total: Optional[torch.Tensor] = None
    squares: Optional[torch.Tensor] = None
    low: float = float("inf")
    high: float = float("-inf")

    def update(self, samples: torch.Tensor) -> None:
        """``samples``: N x entries."""
        s = samples.detach().double().cpu()
        self.total = s.sum(0) if self.total is None else self.total + s.sum(0)
        self.squares = (s * s).sum(0) if self.squares is None else self.squares + (s * s).sum(0)
        self.count += s.shape[0]
        self.low, self.high = min(self.low, float(s.min())), max(self.high, float(s.max()))

    def mean(self) -> torch.Tensor:
        assert self.total is not None
        return self.total / self.count

    def variance(self) -> torch.Tensor:
        """Population variance of each entry (0 with one sample)."""
        assert self.squares is not None
        return (self.squares / self.count - self.mean() ** 2).clamp_min(0.0)


@dataclass
class CoefficientStats:
    """What :func:`collect_coefficients` gathers for one layer."""

    operator: str
    components: Dict[str, RunningMoments] = field(default_factory=dict)
    input_count: int = 0
    input_sum: float = 0.0
    input_squares: float = 0.0
    samples: Dict[str, List[torch.Tensor]] = field(default_factory=dict)  # values kept for histograms
    images: int = 0

    def input_variance(self) -> float:
        if self.input_count == 0:
            return 0.0
        mean = self.input_sum / self.input_count
        return max(0.0, self.input_squares / self.input_count - mean * mean)


def layer_coefficients(module: nn.Module, x: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
    """The dynamic coefficients ``module`` generates for input ``x``, each as samples x entries (the
    operator's ``analysis_coefficients`` hook); None when ``module`` has none to inspect."""
    hook = getattr(module, "analysis_coefficients", None)
    return hook(x) if callable(hook) else None


def _operator(module: nn.Module) -> str:
    from image_classification.dynamic.registry import operator_name

    return operator_name(module)


def collect_coefficients(model: nn.Module, batches, hist_images: int = 256,
                         device: str = "cpu") -> Dict[str, CoefficientStats]:
    """Run ``model`` (eval) over ``batches`` of ``(images, targets)`` and gather per-layer statistics."""
    from image_classification.dynamic.protocol import OperatorProtocol

    stats: Dict[str, CoefficientStats] = {}
    handles = []
    seen = {"images": 0}

    def hook_for(layer: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            coeffs = layer_coefficients(module, x)
            if not coeffs:
                return
            entry = stats.setdefault(layer, CoefficientStats(_operator(module)))
            xd = x.detach().double()
            entry.input_count += xd.numel()
            entry.input_sum += float(xd.sum())
            entry.input_squares += float((xd * xd).sum())
            entry.images += x.shape[0]
            keep = max(0, hist_images - seen["images"])
            for comp, value in coeffs.items():
                entry.components.setdefault(comp, RunningMoments()).update(value)
                if keep:
                    per_image = value.shape[0] // x.shape[0]
                    sample = value[: keep * per_image].detach().float().cpu().flatten()
                    entry.samples.setdefault(comp, []).append(sample)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, OperatorProtocol):  # (an nn.Module too: OperatorProtocol is a mixin)
            handles.append(cast(nn.Module, module).register_forward_pre_hook(hook_for(name)))
    if not handles:
        raise AnalysisError(f"{type(model).__name__} has no dynamic layer: nothing to analyse")
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, _ in batches:
                model(images.to(device))
                seen["images"] += images.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was)
    if not stats:
        raise AnalysisError("no dynamic layer with inspectable coefficients ran (Involution generates kernels, "
                            "not coefficients)")
    return stats


def stats_rows(stats: Dict[str, CoefficientStats]) -> List[Dict[str, object]]:
    rows = []
    for index, (layer, entry) in enumerate(stats.items()):
        input_var = entry.input_variance()
        for comp, moments in entry.components.items():
            sigma = float(moments.variance().mean())
            rows.append({"index": index, "layer": layer, "operator": entry.operator, "component": comp,
                         "entries": int(moments.mean().numel()), "images": entry.images,
                         "mean": float(moments.mean().mean()), "sigma": sigma, "input_var": input_var,
                         "normalized_sigma": sigma / input_var if input_var > 0 else float("nan"),
                         "min": moments.low, "max": moments.high})
    return rows
