"""What PEDConv and spatial PEDConv share, declared once (PEDConv, BMVC 2021, Eq. 1-7 and Sec. 4.6).

Both re-scale a static base weight ``W_base`` by a rank-R CP tensor ``gamma (x) phi (x) psi`` whose
components come from a bottleneck generator (Eq. 7), are sampled in training (Eq. 5) and feed a
training-only info-max decoder (Eq. 6). This module holds the pieces they have in common: the
component names and order, the generator floor, the spec options, the initialisation of the generator
layers (including the learned log-variance heads) and :class:`BaseWeightInfomaxConv2d`.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Protocol, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..base import DynamicConv2d
from ..registry import Option

__all__ = [
    "COMPONENTS",
    "MIN_HIDDEN",
    "INIT_STD",
    "MIN_NOISE_STD",
    "CP_OPTIONS",
    "SAMPLING_OPTIONS",
    "BaseWeightInfomaxConv2d",
    "PEDConvLayer",
    "normal_init",
    "logvar_init_bias",
    "ordered_components",
]

#: the CP components, in the order the info-max decoder concatenates them (the authors' order).
COMPONENTS: Tuple[str, ...] = ("phi", "gamma", "psi")
#: floor of the generator bottleneck ``max(C_in // r, MIN_HIDDEN)``; every ResNet-18/50 dynamic conv
#: has C_in >= 64, so the paper's C_in/16 is used unchanged there (11.92M parameters).
MIN_HIDDEN = 4
#: std of the normal initialisation of every generator / decoder layer (the authors' release)
INIT_STD = 0.01
#: smallest std the learned log-variance heads start at (see :func:`logvar_init_bias`)
MIN_NOISE_STD = 1e-9

#: rank, bottleneck and components (PEDConv, BMVC 2021, Sec. 3; Table 5a/b; Appendix D)
CP_OPTIONS: Dict[str, Option] = {
    "rank": Option(int, 1, "CP decomposition rank R (Table 5b)", minimum=1),
    "reduction": Option(int, 16, "generator bottleneck max(C_in // r, 4) (Appendix D: 16 or 4)", minimum=1),
    "components": Option(
        "set", ("gamma", "phi", "psi"), "dynamic components; left-out ones are fixed to 1 (Table 5a)",
        choices=("gamma", "phi", "psi"),
    ),
}
#: training noise and the info-max decoder (PEDConv, BMVC 2021, Eq. 5-6)
SAMPLING_OPTIONS: Dict[str, Option] = {
    "sampling": Option(
        str, "fixed", "Eq. 5 noise in training: fixed std, learned log-variance, or none",
        choices=("fixed", "learned", "none"),
    ),
    "noise_std": Option(float, 0.1, "std of the fixed training noise on the pre-sigmoid components", minimum=0.0),
    "infomax": Option(bool, True, "build the training-only info-max decoder (Eq. 6)"),
}


class PEDConvLayer(Protocol):
    """What the execution paths, the path selection and the counts read of a PEDConv layer: nn.Conv2d's geometry,
    the CP options, the base weight and the generated factors. :class:`~.layer.PEDConv2d` is one; typing against
    this instead of the layer keeps those modules below it (no import back into ``layer.py``)."""

    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    rank: int
    reparam: str
    components: Tuple[str, ...]

    @property
    def weight(self) -> Tensor:
        """The static base weight ``W_base`` (read-only here, so an ``nn.Parameter`` satisfies it)."""
        ...

    def conv_kwargs(self) -> Dict[str, Any]: ...

    def output_size(self, height: int, width: int) -> Tuple[int, int]: ...

    def component_dims(self) -> Dict[str, int]: ...

    def factors(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]: ...


def normal_init(layer: nn.Linear | nn.Conv2d, bias_value: float = 0.0) -> None:
    """Initialise a generator/decoder Linear or 1x1 Conv2d: weight ~ N(0, INIT_STD), bias = ``bias_value``."""
    nn.init.normal_(layer.weight, 0.0, INIT_STD)
    assert layer.bias is not None, "the generator and decoder layers are built with a bias"
    nn.init.constant_(layer.bias, bias_value)


def logvar_init_bias(noise_std: float) -> float:
    """Initial bias of the learned log-variance heads: ``2 ln(max(noise_std, MIN_NOISE_STD))``.

    ``sampling=learned`` starts where ``sampling=fixed`` stays: the sampled std
    ``exp(0.5 logvar)`` starts at ``noise_std`` (Eq. 5; the head weights are N(0, 0.01), so the
    log-variance is the bias up to a small term). For ``noise_std=0``, where ``fixed`` adds no noise at
    all, the bias is ``2 ln 1e-9 = -41.45``: the std is 1e-9, below float32's resolution of the
    pre-sigmoid components (|z| ~ 1e-2..1, spacing 1e-9..1e-7) and, after the sigmoid (slope <= 1/4),
    of the factors in (0, 1), so the sampled factors and the info-max decoder's input equal the noise-free
    ones to float32 rounding (fp16 under AMP: exp(-20.7) underflows to exactly 0). The earlier -20.0
    gave std e^-10 = 4.5e-5, a visible perturbation of ~1e-5 in the factors. A bias that makes the std
    exactly 0 in float32 (below -207) would also zero its gradient; 1e-9 keeps the head trainable in
    principle and is continuous with ``noise_std -> 0``.
    """
    return 2.0 * math.log(max(float(noise_std), MIN_NOISE_STD))


def ordered_components(owner: str, components: Sequence[str] | str) -> Tuple[str, ...]:
    """``components`` (a sequence or a '+'-joined string) in gamma/phi/psi order; ValueError names ``owner``."""
    if isinstance(components, str):
        components = tuple(part for part in components.split("+") if part)
    if not components or any(c not in COMPONENTS for c in components):
        raise ValueError(f"{owner}: components must be a non-empty subset of gamma/phi/psi, got {components!r}")
    return tuple(c for c in ("gamma", "phi", "psi") if c in components)


class BaseWeightInfomaxConv2d(DynamicConv2d):
    """What PEDConv and spatial PEDConv share: a static base weight ``W_base`` (``weight``, optional
    static ``bias``) and the training-only info-max term of the last forward (``_infomax``)."""

    _infomax: Optional[Tensor] = None
    components: Tuple[str, ...]
    infomax_decoder: Optional[nn.Sequential]

    def factors(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(gamma, phi, psi) for input ``x``; each subclass generates them its own way."""
        raise NotImplementedError

    def _make_base_weight(self, bias: bool) -> None:
        """``weight`` (W_base, Kaiming normal, fan-out) and the optional static ``bias`` (zeros)."""
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(self.out_channels, self.in_channels // self.groups, kh, kw))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        if bias:
            self.bias: Optional[nn.Parameter] = nn.Parameter(torch.zeros(self.out_channels))
        else:
            self.register_parameter("bias", None)

    def __getstate__(self) -> Dict[str, Any]:
        # the last info-max term (and a shared generator's cached components) are graph tensors of the
        # last forward: leave them out so deepcopy (EMA models) and pickling work after training steps
        state = self.__dict__.copy()
        state["_infomax"] = None
        if "_shared_cache" in state:
            state["_shared_cache"] = None
        state.pop("_layout_memo", None)  # refers to this module and its followers
        state.pop("_lean", None)
        return state

    @torch.no_grad()
    def load_static_weight(self, weight: Tensor, bias: Optional[Tensor] = None) -> None:
        """Use a static conv's weight as W_base (and its bias as the static bias)."""
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"{type(self).__name__}.load_static_weight: weight shape {tuple(weight.shape)} != "
                f"{tuple(self.weight.shape)}"
            )
        self.weight.copy_(weight)
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)

    def analysis_coefficients(self, x: Tensor) -> Optional[Dict[str, Tensor]]:
        """The present components gamma/phi/psi for ``x`` (left-out ones are constant and omitted), each
        samples x (R dim); the spatial variant's per-location components count as (B H W) samples."""
        gamma, phi, psi = self.factors(x)
        out = {}
        for comp, value in (("gamma", gamma), ("phi", phi), ("psi", psi)):
            if comp not in self.components:
                continue
            if value.dim() == 5:  # spatial: B x R x dim x H x W -> (B*H*W) x (R*dim)
                value = value.permute(0, 3, 4, 1, 2).reshape(-1, value.shape[1] * value.shape[2])
            out[comp] = value.reshape(value.shape[0], -1)
        return out

    def remove_infomax_decoder(self) -> None:
        """Drop the training-only decoder (deployment); the info-max term is absent afterwards."""
        self.infomax_decoder = None
        self._infomax = None

    def infomax_term(self) -> Optional[Tensor]:
        """Info-max MSE (Eq. 6) of the last training forward; None after an eval forward."""
        return self._infomax

    @torch.no_grad()
    def fold_output_affine(self, scale: Tensor, shift: Tensor) -> None:
        """Fold a following per-output-channel affine map ``scale * y + shift`` (an eval-mode BatchNorm).

        Exact for the multiplicative form (Eq. 2). Output channel o of the layer is
        ``y_o = sum_r gamma_r,o * conv(phi_r * x, W_base[o] * psi_r)_o`` (+ bias_o): every term is linear
        in ``W_base[o]`` and ``gamma`` multiplies per output channel, so ``scale_o`` commutes with it:
        ``scale_o * y_o = sum_r gamma_r,o * conv(phi_r * x, (scale_o W_base[o]) * psi_r)_o + scale_o bias_o``.
        The generator reads the layer's input, not ``W_base``, so the factors are unchanged. Hence
        ``W_base[o] *= scale_o`` and ``bias' = scale * bias + shift`` (a bias is created when absent). The
        spatial variant (per-location gamma, phi, psi) folds the same way. The additive form
        ``W_base + sum_r gamma_r (x) phi_r (x) psi_r`` does not: scaling the CP term would need
        ``scale * gamma`` outside the sigmoid's range, so it raises ValueError and nothing changes.
        """
        if getattr(self, "reparam", "multiplicative") != "multiplicative":
            raise ValueError("additive reparameterization: the BN scale would multiply the sigmoid factor gamma")
        if tuple(scale.shape) != (self.out_channels,) or tuple(shift.shape) != (self.out_channels,):
            raise ValueError(f"{type(self).__name__}.fold_output_affine: scale/shift need {self.out_channels} entries")
        scale, shift = scale.to(self.weight), shift.to(self.weight)
        self.weight.mul_(scale.view(-1, *([1] * (self.weight.dim() - 1))))
        bias = shift if self.bias is None else self.bias * scale + shift
        self.bias = nn.Parameter(bias.clone())
