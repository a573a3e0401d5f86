"""Grad-CAM of several classifiers (e.g. static and PEDConv ResNet-50) on the same images, side by side.

PEDConv appendix A (Fig. 2) compares the Grad-CAM maps of ResNet-50 with static convolution and with PEDConv
on randomly sampled ImageNet validation images. The command line is
``python -m image_classification.tools.gradcam``.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from image_classification.dynamic.base import DynamicConv2d

from .common import AnalysisError

__all__ = ["GradCAM", "default_target_layer", "cam_statistics"]


def default_target_layer(model: nn.Module) -> str:
    """Name of the last top-level child of ``model`` that contains a convolution."""
    last = None
    for name, child in model.named_children():
        if any(isinstance(m, (nn.Conv2d, DynamicConv2d)) for m in child.modules()):
            last = name
    if last is None:
        raise AnalysisError(f"{type(model).__name__} has no convolution to explain")
    return last


class GradCAM:
    """Grad-CAM maps of ``model`` at ``layer`` (module name; default :func:`default_target_layer`)."""

    def __init__(self, model: nn.Module, layer: Optional[str] = None) -> None:
        self.model = model
        self.layer_name = layer or default_target_layer(model)
        try:
            self.layer = model.get_submodule(self.layer_name)
        except AttributeError:
            raise AnalysisError(f"model has no layer {self.layer_name!r}; top-level children: "
                                f"{', '.join(n for n, _ in model.named_children())}") from None

    def __call__(self, images: torch.Tensor, classes: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(maps B x H x W in [0, 1], logits B x classes, explained classes B) for a batch of images."""
        store: Dict[str, torch.Tensor] = {}

        def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            store["activation"] = output

        handle = self.layer.register_forward_hook(keep)
        was = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                logits = self.model(images)
                activation = store.get("activation")
                if not isinstance(activation, torch.Tensor) or activation.dim() != 4:
                    raise AnalysisError(f"layer {self.layer_name!r} does not output a B x C x H x W map")
                if classes is None:
                    classes = logits.argmax(dim=1)
                score = logits.gather(1, classes.view(-1, 1).to(logits.device)).sum()
                (grads,) = torch.autograd.grad(score, activation)
        finally:
            handle.remove()
            self.model.train(was)
        weights = grads.mean(dim=(2, 3), keepdim=True)  # Eq. 1: alpha_k^c
        cam = F.relu((weights * activation).sum(dim=1, keepdim=True)).detach()  # Eq. 2
        cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12).view(-1, 1, 1)
        return cam / peak, logits.detach(), classes.detach()


def cam_statistics(cam: torch.Tensor) -> Dict[str, float]:
    """Peak position (relative y, x) and concentration (share of the map's mass in its top 10 % pixels)."""
    flat = cam.flatten()
    total = float(flat.sum())
    index = int(flat.argmax())
    top = flat.sort(descending=True).values[: max(1, flat.numel() // 10)]
    return {"peak_y": (index // cam.shape[1]) / max(1, cam.shape[0] - 1),
            "peak_x": (index % cam.shape[1]) / max(1, cam.shape[1] - 1),
            "concentration": float(top.sum()) / total if total > 0 else 0.0}
