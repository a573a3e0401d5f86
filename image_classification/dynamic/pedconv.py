"""PEDConv: parameter-efficient dynamic convolution via CP tensor decomposition (Hou & Kung, BMVC 2021).

The per-sample weight is the base weight re-scaled by a rank-R CP tensor (paper Eq. 1-3, rank R in
section 3 "Generalized rank-R decomposition")::

    W(x) = W_base * sum_r gamma_r(x) (x) phi_r(x) (x) psi_r(x)          (multiplicative, Eq. 2)
    W(x) = W_base + sum_r gamma_r(x) (x) phi_r(x) (x) psi_r(x)          (additive, Appendix E)

with gamma in R^{C_out} (output filters), phi in R^{C_in/groups} (input filters) and psi in R^{k*k}
(kernel positions). The components come from a generator (Eq. 7): context pooling (GAP, or the
bilinear 2nd-order pooling of Appendix D) -> Linear(C_in -> C_in/r) -> ReLU -> one Linear head per
component, sampled in training with the reparameterization trick (Eq. 5) and squashed by a sigmoid.
Evaluation uses the mean. A training-only decoder reconstructs the (detached) pooled context from the
sampled pre-sigmoid components; its MSE is the info-max term of Eq. 6.

Execution paths (``path`` option; every path equals ``reference`` to float32 rounding):

* ``reference``   - per sample, ``F.conv2d`` with :meth:`PEDConv2d.dynamic_weight` (the plain formula).
* ``materialize`` - the per-sample effective weights B x C_out x C_in/g x k x k, one grouped conv with
  ``groups = B * groups`` (the authors' design; a single dense conv at batch 1).
* ``fold``        - uses ``conv(x, W*(gamma o phi o psi)) = gamma * conv(phi * x, W * psi)``: gamma and
  phi scale activations, only ``W * psi_b`` is per sample (one grouped conv; a single dense conv at
  batch 1). Rank R sums R such terms. Additive: ``conv(x, W_base)`` plus the low-rank term.
* ``factored``    - gamma and phi on activations and psi applied as k*k shifted 1x1 convolutions
  weighted per sample: no per-sample weight at all. For 1x1 kernels this is a dense conv plus channel
  scalings. Additive: ``conv(x, W_base)`` plus the low-rank term, which reduces to a per-sample
  depthwise k x k conv on ``groups`` channel sums (never a C_out x C_in weight).
* ``unfold``      - gamma and phi on activations, the k*k patches (``F.unfold``) scaled by psi per sample,
  then one matmul with W_base (no per-sample weight). Additive: as ``factored``.
* ``auto`` (default) chooses by shape (measured on CPU with ResNet-18 shapes, see ``_choose_path``):
  depthwise-like layers (C_in/groups == 1) -> ``materialize`` (the per-sample weight is tiny);
  batch 1 -> ``fold`` (``materialize`` for rank > 1 or additive: everything folds into one dense conv),
  but ``unfold`` for k x k kernels with more output channels than output pixels (scaling the k*k patches
  moves less memory than scaling W: ResNet-18 batch-1 inference 1.28x static instead of 1.42x);
  batch > 1: additive or 1x1 kernels -> ``factored``; k x k kernels -> ``fold`` (``materialize`` for
  rank > 1) while the per-sample kernel is at most ``GROUPED_MAX_WEIGHT_RATIO`` times the size of one
  output channel map (``C_out * k * k <= ratio * H_out * W_out``: the grouped conv's weight traffic stays
  comparable to its activations), ``unfold`` beyond (e.g. ResNet-18's 512-channel 7x7 stage).

Parameter names (for profilers and checkpoints): ``weight`` (W_base), ``bias`` (static bias added after
the conv, optional), ``generator.*`` (deploy-time generator: ``generator.proj`` for bilinear context,
``generator.fc_share``, ``generator.heads.<i>.fc_{phi,gamma,psi}[_logvar]``) and ``infomax_decoder.*``
(training only: a profiler counting deploy parameters excludes names containing ``infomax_decoder``;
:meth:`PEDConv2d.remove_infomax_decoder` drops it, ``infomax=False`` never builds it).
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import DynamicConv2d
from .registry import Option, register_operator

__all__ = [
    "PEDConv2d",
    "COMPONENTS",
    "PATHS",
    "MIN_HIDDEN",
    "GROUPED_MAX_WEIGHT_RATIO",
    "share_generator",
    "convert_authors_state_dict",
]

#: the CP components, in the order the info-max decoder concatenates them (the authors' order).
COMPONENTS: Tuple[str, ...] = ("phi", "gamma", "psi")
PATHS: Tuple[str, ...] = ("auto", "reference", "materialize", "fold", "factored", "unfold")
#: floor of the generator bottleneck ``max(C_in // r, MIN_HIDDEN)``; every ResNet-18/50 dynamic conv
#: has C_in >= 64, so the paper's C_in/16 is used unchanged there (11.92M parameters).
MIN_HIDDEN = 4
#: batch > 1, k x k kernels: the grouped per-sample kernel (``fold``/``materialize``) is used while
#: ``C_out * kh * kw <= GROUPED_MAX_WEIGHT_RATIO * H_out * W_out``, else ``unfold``. Measured on the
#: 2-core CPU, train step at batch 32 (ratio to nn.Conv2d): 256 ch @ 14x14 (ratio 11.8) fold 2.8 vs
#: unfold 3.0; 512 ch @ 7x7 (ratio 94) fold 7.6 vs unfold 3.8; CIFAR ResNet-20 at 28 px, batch 128,
#: whole train step: all-fold 2.3x static vs unfold on the 14x14/7x7 stages 2.7x.
GROUPED_MAX_WEIGHT_RATIO = 16
_INIT_STD = 0.01

_OPTIONS = {
    "rank": Option(int, 1, "CP decomposition rank R (Table 5b)", minimum=1),
    "reduction": Option(int, 16, "generator bottleneck max(C_in // r, 4) (Appendix D: 16 or 4)", minimum=1),
    "components": Option(
        "set", ("gamma", "phi", "psi"), "dynamic components; left-out ones are fixed to 1 (Table 5a)",
        choices=("gamma", "phi", "psi"),
    ),
    "context": Option(str, "gap", "generator context pooling (Appendix Table 2)", choices=("gap", "bilinear")),
    "reparam": Option(
        str, "multiplicative", "W_base * CP (Eq. 2) or W_base + CP (Appendix E)",
        choices=("multiplicative", "additive"),
    ),
    "sampling": Option(
        str, "fixed", "Eq. 5 noise in training: fixed std, learned log-variance, or none",
        choices=("fixed", "learned", "none"),
    ),
    "noise_std": Option(float, 0.1, "std of the fixed training noise on the pre-sigmoid components", minimum=0.0),
    "infomax": Option(bool, True, "build the training-only info-max decoder (Eq. 6)"),
    "path": Option(str, "auto", "execution path (all exact): " + "/".join(PATHS), choices=PATHS),
}

Components = Dict[str, Optional[Tensor]]


def _normal_linear(layer: nn.Linear, bias_value: float = 0.0) -> None:
    nn.init.normal_(layer.weight, 0.0, _INIT_STD)
    nn.init.constant_(layer.bias, bias_value)


class _Heads(nn.Module):
    """The component heads of one dynamic conv: Linear(hidden -> R * dim) per present component."""

    def __init__(self, hidden: int, dims: Mapping[str, int], rank: int, learned: bool, noise_std: float) -> None:
        super().__init__()
        self.rank = rank
        self.dims = {name: dims[name] for name in COMPONENTS if name in dims}
        self.learned = learned
        logvar_bias = 2.0 * math.log(noise_std) if noise_std > 0 else -20.0
        for name, dim in self.dims.items():
            head = nn.Linear(hidden, rank * dim)
            _normal_linear(head)
            self.add_module(f"fc_{name}", head)
            if learned:
                # starts at the fixed-noise std, so 'learned' begins where 'fixed' stays
                logvar = nn.Linear(hidden, rank * dim)
                _normal_linear(logvar, logvar_bias)
                self.add_module(f"fc_{name}_logvar", logvar)

    @property
    def total_dim(self) -> int:
        return self.rank * sum(self.dims.values())

    def forward(self, hidden: Tensor) -> Dict[str, Tuple[Tensor, Optional[Tensor]]]:
        out: Dict[str, Tuple[Tensor, Optional[Tensor]]] = {}
        for name in self.dims:
            mean = getattr(self, f"fc_{name}")(hidden)
            logvar = getattr(self, f"fc_{name}_logvar")(hidden) if self.learned else None
            out[name] = (mean, logvar)
        return out


class _Generator(nn.Module):
    """Context pooling -> Linear(C -> hidden) -> ReLU -> heads (Eq. 7); ``heads[i]`` serves conv i."""

    def __init__(self, in_channels: int, hidden: int, context: str) -> None:
        super().__init__()
        self.context = context
        if context == "bilinear":
            # 2nd-order pooling of a channel-reduced projection: d = round(sqrt(C_in)) so the flattened
            # d x d second-moment matrix has about C_in entries and fc_share keeps its size.
            self.proj_dim = max(1, round(math.sqrt(in_channels)))
            self.proj = nn.Linear(in_channels, self.proj_dim, bias=False)
            self.context_dim = self.proj_dim * self.proj_dim
        else:
            self.context_dim = in_channels
        self.fc_share = nn.Linear(self.context_dim, hidden)
        _normal_linear(self.fc_share)
        self.heads = nn.ModuleList()

    def pool(self, x: Tensor) -> Tensor:
        """The context vector: GAP (B x C_in) or bilinear pooling (B x d*d)."""
        if self.context == "gap":
            return x.mean(dim=(2, 3))
        z = F.conv2d(x, self.proj.weight[:, :, None, None]).flatten(2)  # B x d x HW
        second = torch.bmm(z, z.transpose(1, 2)) / z.shape[-1]  # B x d x d (bilinear pooling, Lin et al.)
        second = torch.sign(second) * torch.sqrt(second.abs() + 1e-6)  # signed square root
        return F.normalize(second.flatten(1), dim=1)  # l2 normalization

    def forward(self, x: Tensor) -> Tuple[Tensor, List[Dict[str, Tuple[Tensor, Optional[Tensor]]]]]:
        context = self.pool(x)
        hidden = F.relu(self.fc_share(context))
        return context, [heads(hidden) for heads in self.heads]


class _BaseWeightInfomaxConv2d(DynamicConv2d):
    """What PEDConv and spatial PEDConv share: a static base weight ``W_base`` (``weight``, optional
    static ``bias``) and the training-only info-max term of the last forward (``_infomax``)."""

    _infomax: Optional[Tensor] = None

    def __getstate__(self) -> Dict[str, Any]:
        # the last info-max term (and a shared generator's cached components) are graph tensors of the
        # last forward: leave them out so deepcopy (EMA models) and pickling work after training steps
        state = self.__dict__.copy()
        state["_infomax"] = None
        if "_shared_cache" in state:
            state["_shared_cache"] = None
        return state

    @torch.no_grad()
    def load_static_weight(self, weight: Tensor, bias: Optional[Tensor] = None) -> None:
        """Use a static conv's weight as W_base (and its bias as the static bias)."""
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"{type(self).__name__}.load_static_weight: weight shape {tuple(weight.shape)} != {tuple(self.weight.shape)}"
            )
        self.weight.copy_(weight)
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)

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


@register_operator("pedconv", options=_OPTIONS, help="PEDConv: CP-decomposed dynamic convolution (Hou & Kung 2021)")
class PEDConv2d(_BaseWeightInfomaxConv2d):
    """PEDConv (Eq. 1-7): ``W(x) = W_base * sum_r gamma_r (x) phi_r (x) psi_r`` with a sampled generator.

    Drop-in for :class:`torch.nn.Conv2d` (same constructor arguments and output shape) with the spec
    options of ``pedconv`` as keywords. ``bias=True`` adds a static bias after the dynamic conv.
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
        context: str = "gap",
        reparam: str = "multiplicative",
        sampling: str = "fixed",
        noise_std: float = 0.1,
        infomax: bool = True,
        path: str = "auto",
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        for key, value in (("rank", rank), ("reduction", reduction), ("context", context), ("reparam", reparam),
                           ("sampling", sampling), ("noise_std", noise_std), ("path", path)):
            _OPTIONS[key].check("pedconv", key, value)
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise ValueError(f"PEDConv2d: rank must be an integer >= 1, got {rank!r}")
        if isinstance(components, str):
            components = tuple(part for part in components.split("+") if part)
        bad = [c for c in components if c not in COMPONENTS]
        if bad or not components:
            raise ValueError(f"PEDConv2d: components must be a non-empty subset of gamma/phi/psi, got {components!r}")
        self.rank = rank
        self.reduction = reduction
        self.components = tuple(c for c in ("gamma", "phi", "psi") if c in components)
        self.context = context
        self.reparam = reparam
        self.sampling = sampling
        self.noise_std = float(noise_std)
        self.path = path
        self.hidden = max(in_channels // reduction, MIN_HIDDEN)

        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        if bias:
            self.bias: Optional[nn.Parameter] = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_parameter("bias", None)

        self.generator: Optional[_Generator] = _Generator(in_channels, self.hidden, context)
        self.generator.heads.append(self._make_heads(self.hidden))
        self.infomax_decoder: Optional[nn.Sequential] = None
        if infomax:
            self.infomax_decoder = self._make_decoder(self.generator.heads[0].total_dim)
        self._infomax: Optional[Tensor] = None
        self._followers: List[PEDConv2d] = []  # plain list: not registered as submodules
        self._is_follower = False
        self._shared_cache: Optional[Components] = None


    # ----------------------------------------------------------------------------------- construction
    def component_dims(self) -> Dict[str, int]:
        """Length of each present component: gamma C_out, phi C_in/groups, psi k*k."""
        full = {"gamma": self.out_channels, "phi": self.in_channels // self.groups,
                "psi": self.kernel_size[0] * self.kernel_size[1]}
        return {name: full[name] for name in COMPONENTS if name in self.components}

    def _make_heads(self, hidden: int) -> _Heads:
        return _Heads(hidden, self.component_dims(), self.rank, self.sampling == "learned", self.noise_std)

    def _make_decoder(self, in_dim: int) -> nn.Sequential:
        assert self.generator is not None
        decoder = nn.Sequential(
            nn.Linear(in_dim, self.hidden), nn.ReLU(inplace=True), nn.Linear(self.hidden, self.generator.context_dim)
        )
        _normal_linear(decoder[0])
        _normal_linear(decoder[2])
        return decoder

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", rank={self.rank}, hidden={self.hidden}, components={'+'.join(self.components)}, "
            f"context={self.context}, reparam={self.reparam}, sampling={self.sampling}, path={self.path}"
            + (", shared_follower" if self._is_follower else "")
        )

    # ------------------------------------------------------------------------------------- components
    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"PEDConv2d expects input B x {self.in_channels} x H x W, got {tuple(x.shape)}")

    def _sample(self, x: Tensor, record: bool) -> Components:
        """Post-sigmoid components (None for left-out ones), each B x R x dim.

        Training with ``sampling != 'none'`` draws the Eq. 5 noise on the pre-sigmoid values. With
        ``record`` the info-max term is stored and followers of a shared generator get their components.
        """
        if self._is_follower:
            comps = self._shared_cache
            if comps is None:
                raise RuntimeError("PEDConv2d shares the generator of an earlier conv: run that conv first")
            if record:
                self._shared_cache = None
            return comps
        assert self.generator is not None
        context, outputs = self.generator(x)
        noisy = self.training and self.sampling != "none"
        batch = x.shape[0]
        per_conv: List[Dict[str, Tensor]] = []
        for head_out in outputs:
            pre: Dict[str, Tensor] = {}
            for name, (mean, logvar) in head_out.items():
                if noisy:
                    std = torch.exp(0.5 * logvar) if logvar is not None else self.noise_std
                    mean = mean + std * torch.randn_like(mean)
                pre[name] = mean
            per_conv.append(pre)
        if record:
            if self.training and self.infomax_decoder is not None:
                code = torch.cat([pre[name] for pre in per_conv for name in COMPONENTS if name in pre], dim=1)
                self._infomax = F.mse_loss(self.infomax_decoder(code), context.detach())
            else:
                self._infomax = None
        post = []
        for pre, conv in zip(per_conv, [self] + self._followers):
            comps: Components = {name: None for name in COMPONENTS}
            for name, value in pre.items():
                comps[name] = torch.sigmoid(value).view(batch, conv.rank, -1)
            post.append(comps)
        if record:
            for follower, comps in zip(self._followers, post[1:]):
                follower._shared_cache = comps
        return post[0]

    def _full(self, comps: Components, batch: int, like: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        dims = {"gamma": self.out_channels, "phi": self.in_channels // self.groups,
                "psi": self.kernel_size[0] * self.kernel_size[1]}
        out = []
        for name in ("gamma", "phi", "psi"):
            value = comps[name]
            if value is None:
                value = like.new_ones(batch, self.rank, dims[name])
            out.append(value)
        return out[0], out[1], out[2]

    def factors(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(gamma, phi, psi), each B x R x dim: the post-sigmoid values a forward on ``x`` would use.

        Left-out components are ones. In training with sampling this draws fresh noise (so two calls
        differ); in eval it is the deterministic mean. It does not touch the info-max term. A conv that
        shares an earlier conv's generator returns the components cached by that conv's last forward.
        """
        self._check_input(x)
        return self._full(self._sample(x, record=False), x.shape[0], x)

    def _effective_weight(self, gamma: Tensor, phi: Tensor, psi: Tensor) -> Tensor:
        batch = gamma.shape[0]
        cp = torch.einsum("brt,brs,brk->btsk", gamma, phi, psi)
        cp = cp.reshape(batch, *self.weight.shape)
        return self.weight * cp if self.reparam == "multiplicative" else self.weight + cp

    def dynamic_weight(self, x: Tensor) -> Tensor:
        """Per-sample effective weight B x C_out x C_in/g x kh x kw (Eq. 2 / Appendix E), for inspection."""
        return self._effective_weight(*self.factors(x))

    # -------------------------------------------------------------------------------------- execution
    def _choose_path(self, x: Tensor) -> str:
        """``auto``: measured on a 2-core CPU with ResNet-18 3x3 shapes (forward, ratio to nn.Conv2d).

        batch 1: ``fold`` 0.95-1.3x (``materialize`` up to 1.9x at 512 ch, ``factored`` 3x);
        batch 32: 56x56/28x28 maps: ``fold``/``materialize`` 0.9-1.7x vs ``factored`` 3-11x and ``unfold``
        4-7x forward, 1.1-1.5x vs 2.6-19x forward+backward; 14x14/7x7 maps with 256/512 channels:
        ``unfold`` 2.3-4.0x forward and 2.8-3.8x forward+backward vs grouped ``fold`` 3.4-16x / 2.7-7.6x
        and ``factored`` 1.7-7.8x / 6.5-9.4x (a shared, loaded machine: ratios are indicative).
        """
        if self.path != "auto":
            return self.path
        batch = x.shape[0]
        kh, kw = self.kernel_size
        single = self.rank == 1 or len(self.components) == 1
        if self.in_channels // self.groups == 1:
            return "materialize"
        ho, wo = self.output_size(x.shape[2], x.shape[3])
        if batch == 1:
            if not (single and self.reparam == "multiplicative"):
                return "materialize"
            # W * psi costs C_out * C_in/g * k*k; the psi-scaled patches C_in/g * k*k * H_out * W_out
            return "unfold" if kh * kw > 1 and self.out_channels > ho * wo else "fold"
        if self.reparam == "additive" or kh * kw == 1:
            return "factored"
        if self.out_channels * kh * kw <= GROUPED_MAX_WEIGHT_RATIO * ho * wo:
            return "fold" if single else "materialize"
        return "unfold"

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        comps = self._sample(x, record=True)
        path = self._choose_path(x)
        if path in ("reference", "materialize"):
            weights = self._effective_weight(*self._full(comps, x.shape[0], x))
            out = self._run_reference(x, weights) if path == "reference" else self._run_materialized(x, weights)
        elif self.reparam == "additive":
            out = F.conv2d(x, self.weight, None, groups=self.groups, **self.conv_kwargs())
            out = out + self._lowrank_term(x, *self._full(comps, x.shape[0], x))
        else:
            out = self._run_factored(x, comps, mode=path)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def _run_reference(self, x: Tensor, weights: Tensor) -> Tensor:
        outs = [
            F.conv2d(x[b : b + 1], weights[b], None, groups=self.groups, **self.conv_kwargs())
            for b in range(x.shape[0])
        ]
        return torch.cat(outs, dim=0)

    def _run_materialized(self, x: Tensor, weights: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        if batch == 1:
            return F.conv2d(x, weights[0], None, groups=self.groups, **self.conv_kwargs())
        out = F.conv2d(
            x.reshape(1, batch * channels, height, width), weights.reshape(-1, *weights.shape[2:]), None,
            groups=batch * self.groups, **self.conv_kwargs(),
        )
        return out.view(batch, self.out_channels, out.shape[-2], out.shape[-1])

    def _run_factored(self, x: Tensor, comps: Components, mode: str) -> Tensor:
        """Multiplicative: sum_r gamma_r * conv(phi_r * x, W * psi_r) without any C_out x C_in per-sample weight."""
        batch = x.shape[0]
        gamma, phi, psi = comps["gamma"], comps["phi"], comps["psi"]
        rank = self.rank
        if len(self.components) == 1 and rank > 1:
            # a single present component: sum_r W * c_r = W * (sum_r c_r), one term
            gamma, phi, psi = (None if c is None else c.sum(dim=1, keepdim=True) for c in (gamma, phi, psi))
            rank = 1
        out: Optional[Tensor] = None
        for r in range(rank):
            u = x
            if phi is not None:
                u = x * phi[:, r].repeat(1, self.groups).view(batch, -1, 1, 1)
            y = self._psi_conv(u, None if psi is None else psi[:, r], mode)
            if gamma is not None:
                y = y * gamma[:, r].view(batch, -1, 1, 1)
            out = y if out is None else out + y
        assert out is not None
        return out

    def _psi_conv(self, u: Tensor, psi: Optional[Tensor], mode: str) -> Tensor:
        """Per-sample ``conv(u_b, W * psi_b)``; psi is B x kh*kw or None (all ones).

        ``fold``: grouped conv with the per-sample kernel W * psi_b; ``factored``: k*k shifted 1x1 convs
        weighted by psi; ``unfold``: the k*k patches scaled by psi, then one matmul with W_base.
        """
        kwargs = self.conv_kwargs()
        if psi is None:
            return F.conv2d(u, self.weight, None, groups=self.groups, **kwargs)
        batch = u.shape[0]
        kh, kw = self.kernel_size
        if kh * kw == 1:
            return F.conv2d(u, self.weight, None, groups=self.groups, **kwargs) * psi.view(batch, 1, 1, 1)
        if mode == "unfold":
            ho, wo = self.output_size(u.shape[2], u.shape[3])
            groups = self.groups
            patches = F.unfold(u, self.kernel_size, self.dilation, self.padding, self.stride)
            patches = patches.view(batch, groups, -1, kh * kw, ho * wo) * psi.view(batch, 1, 1, kh * kw, 1)
            weight = self.weight.reshape(groups, self.out_channels // groups, -1)
            y = torch.matmul(weight, patches.view(batch, groups, weight.shape[-1], ho * wo))
            return y.view(batch, self.out_channels, ho, wo)
        if mode != "factored":
            if batch == 1:
                return F.conv2d(u, self.weight * psi.view(1, 1, kh, kw), None, groups=self.groups, **kwargs)
            weights = self.weight.unsqueeze(0) * psi.view(batch, 1, 1, kh, kw)
            return self._run_materialized(u, weights)
        # k*k shifted 1x1 convolutions, each weighted by its psi value per sample
        ho, wo = self.output_size(u.shape[2], u.shape[3])
        (ph, pw), (sh, sw), (dh, dw) = self.padding, self.stride, self.dilation
        padded = F.pad(u, (pw, pw, ph, ph)) if ph or pw else u
        out: Optional[Tensor] = None
        for i in range(kh):
            for j in range(kw):
                window = padded[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
                y = F.conv2d(window, self.weight[:, :, i : i + 1, j : j + 1], None, groups=self.groups)
                y = y * psi[:, i * kw + j].view(batch, 1, 1, 1)
                out = y if out is None else out + y
        assert out is not None
        return out

    def _lowrank_term(self, x: Tensor, gamma: Tensor, phi: Tensor, psi: Tensor) -> Tensor:
        """``conv(x, sum_r gamma_r (x) phi_r (x) psi_r)`` (Appendix E) via channel sums and a depthwise psi conv."""
        batch, _, height, width = x.shape
        groups, rank = self.groups, self.rank
        kh, kw = self.kernel_size
        cin_g, cout_g = self.in_channels // groups, self.out_channels // groups
        z = torch.einsum("bgshw,brs->brghw", x.reshape(batch, groups, cin_g, height, width), phi)
        kernel = psi.reshape(batch * rank, 1, 1, kh, kw).expand(batch * rank, groups, 1, kh, kw)
        y = F.conv2d(
            z.reshape(1, batch * rank * groups, height, width), kernel.reshape(-1, 1, kh, kw), None,
            groups=batch * rank * groups, **self.conv_kwargs(),
        )
        y = y.view(batch, rank, groups, y.shape[-2], y.shape[-1])
        out = torch.einsum("brghw,brgo->bgohw", y, gamma.view(batch, rank, groups, cout_g))
        return out.reshape(batch, self.out_channels, y.shape[-2], y.shape[-1])


def share_generator(convs: Sequence[PEDConv2d]) -> None:
    """Partial sharing (Appendix D, Table 2): one generator for the dynamic convs of a residual block.

    The first conv's generator (its context pooling and ``fc_share``, fed with the first conv's input,
    i.e. the block input) gets one set of heads per conv; the later convs drop their own generator and
    info-max decoder and use the components computed by the first conv in the same forward (so the
    first conv must run before the others, as in a residual block). The info-max decoder of the first
    conv reconstructs its context from the concatenation of all convs' sampled components. All convs
    must use the same ``context``/``sampling``/``noise_std``; ranks and components may differ.
    """
    convs = list(convs)
    if not convs or not all(isinstance(conv, PEDConv2d) for conv in convs):
        raise ValueError("share_generator: give a non-empty sequence of PEDConv2d layers")
    if len({id(conv) for conv in convs}) != len(convs):
        raise ValueError("share_generator: the same layer appears twice")
    for conv in convs:
        if conv._is_follower or conv._followers:
            raise ValueError("share_generator: a layer already takes part in a shared generator")
    leader, followers = convs[0], convs[1:]
    for conv in followers:
        for attr in ("sampling", "noise_std"):
            if getattr(conv, attr) != getattr(leader, attr):
                raise ValueError(f"share_generator: all layers need the same {attr}, got "
                                 f"{getattr(leader, attr)!r} and {getattr(conv, attr)!r}")
    if not followers:
        return
    assert leader.generator is not None
    ref = leader.weight
    for conv in followers:
        heads = conv._make_heads(leader.hidden).to(device=ref.device, dtype=ref.dtype)
        leader.generator.heads.append(heads)
        conv.generator = None
        conv.infomax_decoder = None
        conv._is_follower = True
        conv._infomax = None
    leader._followers = followers
    if leader.infomax_decoder is not None:
        total = sum(heads.total_dim for heads in leader.generator.heads)
        leader.infomax_decoder = leader._make_decoder(total).to(device=ref.device, dtype=ref.dtype)


_AUTHORS_KEYS = (
    (re.compile(r"(^|\.)attn\.fc_share\."), r"\1generator.fc_share."),
    (re.compile(r"(^|\.)attn\.fc_inp\."), r"\1generator.heads.0.fc_phi."),
    (re.compile(r"(^|\.)attn\.fc_oup\."), r"\1generator.heads.0.fc_gamma."),
    (re.compile(r"(^|\.)attn\.fc_k\."), r"\1generator.heads.0.fc_psi."),
    (re.compile(r"(^|\.)attn\.decoder\."), r"\1infomax_decoder."),
)


def _authors_rank(converted: Mapping[str, Any], layer: str) -> Tuple[int, Dict[str, int]]:
    """Rank R and component lengths of one converted authors' layer, from its heads and base weight."""
    base = converted.get(f"{layer}.weight")
    if not isinstance(base, Tensor) or base.dim() != 4:
        raise ValueError(f"convert_authors_state_dict: cannot infer the rank of {layer}: "
                         f"its base weight {layer}.weight is missing")
    cout, cin_g, kh, kw = base.shape
    dims = {"phi": cin_g, "gamma": cout, "psi": kh * kw}
    rows = {name: converted[f"{layer}.generator.heads.0.fc_{name}.weight"].shape[0]
            for name in COMPONENTS if f"{layer}.generator.heads.0.fc_{name}.weight" in converted}
    ranks = {name: n // dims[name] for name, n in rows.items() if n % dims[name] == 0}
    if len(ranks) != len(rows) or len(set(ranks.values())) != 1 or 0 in ranks.values():
        found = ", ".join(f"fc_{name} {n} rows" for name, n in rows.items())
        raise ValueError(f"convert_authors_state_dict: {layer}: heads ({found}) are no common rank R of "
                         f"C_in/g={cin_g}, C_out={cout}, k*k={kh * kw}")
    return next(iter(ranks.values())), {name: dims[name] for name in rows}


def _rank_major(t: Tensor, dim: int, rank: int, axis: int) -> Tensor:
    """Reorder ``axis`` of ``t`` from the authors' (dim, R) order to PEDConv2d's (R, dim) order."""
    moved = t.movedim(axis, 0)
    out = moved.reshape(dim, rank, *moved.shape[1:]).transpose(0, 1).reshape(moved.shape)
    return out.movedim(0, axis).contiguous()


def convert_authors_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Map a state dict of the authors' PEDConv release onto :class:`PEDConv2d` names.

    Accepts the checkpoint dict itself (a ``'state_dict'`` entry is unwrapped). Strips a ``module.``
    prefix from every key; renames ``P.attn.fc_share``/``fc_inp`` (phi)/``fc_oup`` (gamma)/``fc_k`` (psi)
    to ``P.generator.fc_share``/``P.generator.heads.0.fc_{phi,gamma,psi}`` and ``P.attn.decoder.{0,2}``
    to ``P.infomax_decoder.{0,2}``. The decoder input order is the same as the authors'
    ([phi; gamma; psi], pre-sigmoid). Other keys (``P.weight``, BatchNorm, fc, ...) are kept unchanged.

    Rank R (the authors' ``Attn4d_CP`` with ``r > 1``): their heads output ``dim * R`` values read as
    ``view(B, dim, R)`` (row ``d * R + r``), where :class:`PEDConv2d` reads ``view(B, R, dim)`` (row
    ``r * dim + d``). R is inferred per layer from the head sizes and the base weight ``P.weight``;
    rows of the heads (weights and biases) and the matching columns of the decoder's first layer are
    reordered. A layer whose heads are no common multiple of its component lengths, or whose base
    weight is missing, or whose decoder input width is not ``R (C_in/g + C_out + k*k)``, raises
    ValueError naming the layer: nothing is loaded silently wrong.
    """
    inner = state_dict.get("state_dict") if isinstance(state_dict.get("state_dict"), Mapping) else None
    source = inner if inner is not None else state_dict
    converted: Dict[str, Any] = {}
    for key, value in source.items():
        name = key[len("module."):] if key.startswith("module.") else key
        for pattern, repl in _AUTHORS_KEYS:
            name = pattern.sub(repl, name)
        converted[name] = value
    layers = sorted({k.split(".generator.heads.0.fc_")[0] for k in converted if ".generator.heads.0.fc_" in k})
    for layer in layers:
        rank, dims = _authors_rank(converted, layer)
        if rank == 1:
            continue
        for name, dim in dims.items():
            for field in ("weight", "bias"):
                key = f"{layer}.generator.heads.0.fc_{name}.{field}"
                if key in converted:
                    converted[key] = _rank_major(converted[key], dim, rank, 0)
        key = f"{layer}.infomax_decoder.0.weight"
        if key in converted:
            decoder = converted[key]
            width = rank * sum(dims.values())
            if decoder.dim() != 2 or decoder.shape[1] != width:
                raise ValueError(f"convert_authors_state_dict: {key} reads {decoder.shape[-1]} inputs, rank {rank} "
                                 f"heads give {width}")
            pieces, start = [], 0
            for name in COMPONENTS:
                if name in dims:
                    size = rank * dims[name]
                    pieces.append(_rank_major(decoder[:, start:start + size], dims[name], rank, 1))
                    start += size
            converted[key] = torch.cat(pieces, 1)
    return converted
