"""Spatial-dynamic PEDConv (Hou & Kung 2021, section 4.6, Table 6).

At every output location p the CP components are generated from the channel vector of the input
at that location by the bottleneck MLP of Eq. 7, implemented as 1x1 convolutions (shared across
locations), and re-scale the base weight there::

    Y[t, p] = sum_r sum_{s, j} gamma_r(p)_t phi_r(p)_s psi_r(p)_j W_base[t, s, j] X[s, p + offset_j]

(Eq. 3 with p-dependent components). The generator's input at p is the channel vector at the centre
of p's receptive window (the input pixel itself for 'same' padding and stride 1). The components are
sampled in training as in Eq. 5 (``sampling``) and an optional training-only info-max decoder
(1x1 convs, Eq. 6) reconstructs the detached channel vector at each location from its sampled
pre-sigmoid components; the paper does not say whether the spatial variant keeps info-max, so it is an
option (default on, as for PEDConv).

Execution is by unfolding, as the paper describes: ``F.unfold`` gives the k*k patches, the patches are
scaled by phi and psi per location, one (grouped) matmul with W_base follows, then gamma. The paper
uses it with depthwise base convolutions (``groups = C``) replacing the 3x3 convs of ResNet-50/101;
other ``groups`` (dense included) are supported too, at the cost of an unfolded C_in*k*k x L matrix.
The reparameterization is multiplicative only (the paper's spatial variant).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..protocol import ExportRoute
from ..registry import register_operator
from .common import (
    COMPONENTS,
    CP_OPTIONS,
    MIN_HIDDEN,
    SAMPLING_OPTIONS,
    BaseWeightInfomaxConv2d,
    logvar_init_bias,
    normal_init,
    ordered_components,
)

__all__ = ["SpatialPEDConv2d"]

_OPTIONS = {**CP_OPTIONS, **SAMPLING_OPTIONS}


def _conv1x1(in_ch: int, out_ch: int, bias_value: float = 0.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, 1)
    normal_init(conv, bias_value)
    return conv


@register_operator(
    "pedconv_spatial", options=_OPTIONS, help="spatial-dynamic PEDConv (per-pixel CP components, section 4.6)"
)
class SpatialPEDConv2d(BaseWeightInfomaxConv2d):
    """Spatial-dynamic PEDConv: per-location CP components from a 1x1-conv bottleneck generator.

    Drop-in for :class:`torch.nn.Conv2d` (meant for depthwise 3x3 convs, any ``groups`` works).
    Parameter names: ``weight``, ``bias``, ``generator.fc_share``, ``generator.fc_{phi,gamma,psi}[_logvar]``
    and the training-only ``infomax_decoder`` (excluded from deploy parameter counts).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Tuple[int, int],
        stride: int | Tuple[int, int] = 1,
        padding: int | Tuple[int, int] = 0,
        dilation: int | Tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        rank: int = 1,
        reduction: int = 16,
        components: Sequence[str] = ("gamma", "phi", "psi"),
        sampling: str = "fixed",
        noise_std: float = 0.1,
        infomax: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.check_options(rank=rank, reduction=reduction, components=components, sampling=sampling,
                           noise_std=noise_std, infomax=infomax)
        self.rank = rank
        self.components = ordered_components("SpatialPEDConv2d", components)
        self.sampling = sampling
        self.noise_std = float(noise_std)
        self.hidden = max(in_channels // reduction, MIN_HIDDEN)
        kh, kw = self.kernel_size
        self._make_base_weight(bias)
        dims = {"gamma": out_channels, "phi": in_channels // groups, "psi": kh * kw}
        self.dims = {name: dims[name] for name in COMPONENTS if name in self.components}
        self.generator = nn.Module()
        self.generator.fc_share = _conv1x1(in_channels, self.hidden)
        logvar_bias = logvar_init_bias(self.noise_std)
        for name, dim in self.dims.items():
            self.generator.add_module(f"fc_{name}", _conv1x1(self.hidden, rank * dim))
            if sampling == "learned":
                self.generator.add_module(f"fc_{name}_logvar", _conv1x1(self.hidden, rank * dim, logvar_bias))
        self.infomax_decoder: Optional[nn.Sequential] = None
        if infomax:
            total = rank * sum(self.dims.values())
            self.infomax_decoder = nn.Sequential(
                _conv1x1(total, self.hidden), nn.ReLU(inplace=True), _conv1x1(self.hidden, in_channels)
            )
        self._infomax: Optional[Tensor] = None


    def extra_repr(self) -> str:
        return (super().extra_repr() + f", rank={self.rank}, hidden={self.hidden}, "
                f"components={'+'.join(self.components)}, sampling={self.sampling}")

    #: dynamic_weight is per location (B x C_out x C_in/g x kh x kw x H_out x W_out)
    per_sample_weight = False

    def export_route(self) -> ExportRoute:
        """Export as trained (unfold, per-location factors: no grouped conv over the batch)."""
        return ExportRoute(label="unfold (as trained)")

    def macs(self, input_shape: Tuple[int, ...]) -> int:
        """``B (R H_out W_out C_out C_in/g k^2 + H_out W_out (C_in h + h R sum(dims)))``: the R unfolded
        matmuls with W_base (one per rank, see :meth:`forward`) and the per-location generator
        (``fc_share`` and the mean heads, 1x1 convs); the element-wise scalings by phi, psi and gamma
        are not counted (as in the papers)."""
        batch, _, height, width = (int(s) for s in input_shape)
        out_h, out_w = self.output_size(height, width)
        generator = self.in_channels * self.hidden + self.hidden * self.rank * sum(self.dims.values())
        return self.rank * self.static_macs(input_shape) + batch * out_h * out_w * generator

    def _centres(self, x: Tensor) -> Tensor:
        """Channel vectors at the centre of every output location's window: B x C_in x H_out x W_out."""
        (ph, pw), (sh, sw), (dh, dw) = self.padding, self.stride, self.dilation
        kh, kw = self.kernel_size
        ho, wo = self.output_size(x.shape[2], x.shape[3])
        padded = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
        top, left = dh * (kh - 1) // 2, dw * (kw - 1) // 2
        return padded[:, :, top : top + sh * (ho - 1) + 1 : sh, left : left + sw * (wo - 1) + 1 : sw]

    def _sample(self, x: Tensor, record: bool) -> Dict[str, Optional[Tensor]]:
        """Post-sigmoid components, each B x R x dim x H_out x W_out (None for left-out ones)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SpatialPEDConv2d expects input B x {self.in_channels} x H x W, got {tuple(x.shape)}")
        centres = self._centres(x)
        batch, _, ho, wo = centres.shape
        hidden = F.relu(cast(nn.Conv2d, self.generator.fc_share)(centres))
        noisy = self.training and self.sampling != "none"
        pre: List[Tensor] = []
        comps: Dict[str, Optional[Tensor]] = {name: None for name in COMPONENTS}
        for name in self.dims:
            value = getattr(self.generator, f"fc_{name}")(hidden)
            if noisy:
                std = (torch.exp(0.5 * getattr(self.generator, f"fc_{name}_logvar")(hidden))
                       if self.sampling == "learned" else self.noise_std)
                value = value + std * torch.randn_like(value)
            pre.append(value)
            comps[name] = torch.sigmoid(value).view(batch, self.rank, -1, ho, wo)
        if record:
            if self.training and self.infomax_decoder is not None:
                self._infomax = F.mse_loss(self.infomax_decoder(torch.cat(pre, dim=1)), centres.detach())
            else:
                self._infomax = None
        return comps

    def factors(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(gamma, phi, psi), each B x R x dim x H_out x W_out (left-out ones are ones)."""
        comps = self._sample(x, record=False)
        ref = next(v for v in comps.values() if v is not None)
        batch, rank, _, ho, wo = ref.shape
        full = {"gamma": self.out_channels, "phi": self.in_channels // self.groups,
                "psi": self.kernel_size[0] * self.kernel_size[1]}
        out: List[Tensor] = []
        for name in ("gamma", "phi", "psi"):
            value = comps[name]
            out.append(value if value is not None else ref.new_ones(batch, rank, full[name], ho, wo))
        return out[0], out[1], out[2]

    def dynamic_weight(self, x: Tensor) -> Tensor:
        """Per-location weights B x C_out x C_in/g x kh x kw x H_out x W_out, for inspection and tests."""
        gamma, phi, psi = self.factors(x)
        cp = torch.einsum("brtyx,brsyx,brkyx->btskyx", gamma, phi, psi)
        kh, kw = self.kernel_size
        cp = cp.reshape(cp.shape[0], self.out_channels, self.in_channels // self.groups, kh, kw, *cp.shape[-2:])
        return self.weight[None, ..., None, None] * cp

    def forward(self, x: Tensor) -> Tensor:
        comps = self._sample(x, record=True)
        batch, _, height, width = x.shape
        ho, wo = self.output_size(height, width)
        groups, kh, kw = self.groups, *self.kernel_size
        cin_g, cout_g = self.in_channels // groups, self.out_channels // groups
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        patches = patches.view(batch, groups, cin_g, kh * kw, ho * wo)
        weight = self.weight.reshape(groups, cout_g, cin_g * kh * kw)
        gamma, phi, psi = comps["gamma"], comps["phi"], comps["psi"]
        out: Optional[Tensor] = None
        for r in range(self.rank):
            scaled = patches
            if phi is not None:
                scaled = scaled * phi[:, r].reshape(batch, 1, cin_g, 1, ho * wo)
            if psi is not None:
                scaled = scaled * psi[:, r].reshape(batch, 1, 1, kh * kw, ho * wo)
            y = torch.matmul(weight, scaled.reshape(batch, groups, cin_g * kh * kw, ho * wo))
            y = y.reshape(batch, self.out_channels, ho * wo)
            if gamma is not None:
                y = y * gamma[:, r].reshape(batch, self.out_channels, ho * wo)
            out = y if out is None else out + y
        assert out is not None
        out = out.view(batch, self.out_channels, ho, wo)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out
