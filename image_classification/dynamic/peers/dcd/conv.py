"""DCD's dynamic convolution (DCD, ICLR 2021, Eq. 6-9): ``Lambda(x) W0 + P Phi(x) Q^T`` in its channel-fusion,
joint and depthwise forms, as written (``variant=paper``) or as released (``variant=released``).

The forms, sizes, the release's differences and the execution paths are described in docs/operators.md
("DCD: forms, sizes and execution"); every path equals the per-sample reference ``F.conv2d(x_b, W(x)_b)`` with
:meth:`DCDConv2d.dynamic_weight`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...base import DynamicConv2d
from ...functional import batchnorm_affine
from ...protocol import ExportRoute, PerSampleUnfoldConv2d
from ...registry import ConvSpec, Option, register_operator
from .common import VARIANTS, branch_hidden, coefficient_table, lambda_activation, uses_batch_stats
from .linear import DCDLinear
from .released import RELEASED_LAYOUT
from .sizes import SIZINGS, plan_layer

__all__ = ["DCDConv2d", "PATHS"]

#: execution paths (``path`` attribute): ``auto`` picks ``branch`` at batch > 1, ``fold`` at batch 1 and depthwise
PATHS = ("auto", "branch", "fold")


def _add_low_rank(y: torch.Tensor, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``y + P Z`` per (sample, block): ``y`` is B x C_out x H x W, ``p`` (B*nb) x ob x L, ``z`` (B*nb) x L x HW.

    In place where that is safe and seen: ``y`` is a fresh output no backward formula saved, and baddbmm's
    backward needs only ``p`` and ``z``, so accumulating into it spares a copy of the output. Out of place when
    the B x nb flattening is a copy (a channels_last ``y`` with several blocks: a write into the copy would
    be lost), under tracing or ONNX export (the TorchScript-based exporter drops in-place writes through a
    reshape view) and under torch.compile."""
    flat = y.reshape(p.shape[0], p.shape[1], z.shape[2])
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() \
            or not flat._is_view():  # (a compiled graph is functionalised: out of place costs nothing there)
        return torch.baddbmm(flat, p, z).reshape(y.shape)
    flat.baddbmm_(p, z)
    return y


@register_operator(
    "dcd",
    options={
        "mode": Option(str, "channel", "k x k form: 'channel' fusion alone (1x1 residual) or 'joint' (Eq. 9)",
                       choices=("channel", "joint")),
        "blocks": Option(int, 1, "B diagonal blocks of the dynamic residual (Eq. 7)", minimum=1),
        "latent": Option(int, 0, "latent size L (0 = the sizing rule's)", minimum=0),
        "latent_kernel": Option(int, 0, "latent kernel elements L_k (0 = floor(k^2/2))", minimum=0),
        "reduction": Option(int, 16, "reduction r of the dynamic branch's first FC", minimum=1),
        "pool": Option(int, 0, "context pooling grid (0 = the sizing rule's)", minimum=0),
        "components": Option("set", ("lambda", "phi"), "dynamic parts kept (Table 1 ablation)",
                             choices=("lambda", "phi")),
        "variant": Option(str, "paper", "'paper': Eq. 6-9 as written; 'released': the authors' code (BatchNorm + "
                          "identity in the residual, gated branch, bias scaled by Lambda)", choices=VARIANTS),
        "sizing": Option(str, "auto", "latent/context/hidden rule: paper (Sec. 3.2), resnet_basic, resnet_bottleneck, "
                         "mobilenetv2 (the released modules); auto = paper, or the enclosing block's released rule",
                         choices=SIZINGS),
    },
    help="DCD (Li et al. 2021): Lambda(x) W0 + P Phi(x) Q^T",
)

class DCDConv2d(DynamicConv2d):
    """Dynamic convolution decomposition, Eq. 6-9 of Li et al. (2021); see docs/operators.md."""

    #: the authors' released checkpoints load through their converter (:func:`convert_released_state_dict`)
    foreign_layouts = (RELEASED_LAYOUT,)

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
        mode: str = "channel",
        blocks: int = 1,
        latent: int = 0,
        latent_kernel: int = 0,
        reduction: int = 16,
        pool: int = 0,
        components: Tuple[str, ...] = ("lambda", "phi"),
        variant: str = "paper",
        sizing: str = "auto",
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.check_options(mode=mode, blocks=blocks, latent=latent, latent_kernel=latent_kernel, reduction=reduction,
                           pool=pool, components=components, variant=variant, sizing=sizing)
        components = tuple(components.split("+")) if isinstance(components, str) else tuple(components)
        self.use_lambda = "lambda" in components
        self.use_phi = "phi" in components
        plan = plan_layer(in_channels, out_channels, self.kernel_size, groups, mode=mode, blocks=blocks, latent=latent,
                          latent_kernel=latent_kernel, reduction=reduction, pool=pool, use_lambda=self.use_lambda,
                          use_phi=self.use_phi, variant=variant, sizing=sizing)
        self.variant, self.mode, self.form, self.sizing = variant, mode, plan.form, plan.sizing
        self.blocks, self.num_blocks = plan.blocks, plan.num_blocks
        self.latent, self.latent_kernel, self.pool = plan.latent, plan.latent_kernel, plan.pool
        self.hidden, self.n_phi = plan.hidden, plan.n_phi
        self.path = "auto"  # execution path, see forward(); set to "branch" or "fold" to force one
        kh, kw = self.kernel_size
        taps, form, cb, n_lambda, ctx = kh * kw, plan.form, plan.block_in, plan.n_lambda, in_channels * plan.pool ** 2
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.fc1 = nn.Linear(ctx, self.hidden, bias=False)
        # the release's SE-like gate on the hidden vector (variant=released) instead of ReLU
        self.gate = nn.Linear(self.hidden, self.hidden, bias=False) if variant == "released" else None
        self.fc2 = nn.Linear(self.hidden, n_lambda + self.n_phi, bias=False)
        L, Lk = self.latent, self.latent_kernel
        self.bn_q: Optional[nn.BatchNorm2d] = None
        self.bn_phi: Optional[nn.BatchNorm2d] = None
        if self.use_phi:
            if form == "depthwise":
                self.P = nn.Parameter(torch.empty(out_channels, Lk))
                self.R = nn.Parameter(torch.empty(taps, Lk))
            else:
                # Q: block n maps its C_b inputs to L latent channels; P maps L back to C_out/nb outputs.
                self.Q = nn.Parameter(torch.empty(self.num_blocks * L, cb, 1, 1))
                self.P = nn.Parameter(torch.empty(out_channels, L, 1, 1))
                if form == "joint":
                    self.R = nn.Parameter(torch.empty(Lk, taps))
            if variant == "released":
                # BN1 on Q^T x and BN2 on Phi(BN1(Q^T x)), per latent channel (the release's bn1/bn2)
                self.bn_q = nn.BatchNorm2d(self.num_blocks * L)
                self.bn_phi = nn.BatchNorm2d(self.num_blocks * L)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        for name in ("P", "Q", "R"):
            param = getattr(self, name, None)
            if param is None:
                continue
            if self.variant == "released":  # the release's conv init: N(0, 2 / (k^2 C_out)) for its 1x1 q, p
                nn.init.normal_(param, 0.0, math.sqrt(2.0 / param.shape[0]))
                continue
            fan_in = param.shape[1] * (param[0, 0].numel() if param.dim() > 2 else 1)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(param, -bound, bound)

    @classmethod
    def site_options(cls, options: Mapping[str, Any], conv: nn.Conv2d,
                     block: Optional[nn.Module]) -> Optional[Dict[str, Any]]:
        """Per-conv options when :func:`~image_classification.models.convert_model` converts a model.

        ``variant=released`` with ``sizing=auto`` takes the rule of the released module that the
        enclosing block uses (``BasicBlock`` -> ``resnet_basic``, ``Bottleneck`` ->
        ``resnet_bottleneck``, ``InvertedResidual`` -> ``mobilenetv2``, anything else the generic
        ``conv_dy`` rule); the convs of an inverted residual without expansion stay static (None),
        as in the release. Other specs are used unchanged.
        """
        if options.get("variant") != "released" or options.get("sizing", "auto") != "auto":
            return {}
        kind = type(block).__name__ if block is not None else ""
        if kind == "BasicBlock":
            return {"sizing": "resnet_basic"}
        if kind == "InvertedResidual" and block is not None:
            first = next((m for m in block.modules() if isinstance(m, nn.Conv2d)), None)
            if first is not None and first.groups > 1 and first.groups == first.in_channels:
                return None  # expansion 1: the released InvertedResidual ignores its 'dy' flag
            return {"sizing": "mobilenetv2"}
        return {"sizing": "resnet_bottleneck"}

    def load_static_weight(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        """Seed W0 (and the bias) from a static conv of the same geometry."""
        if weight.shape != self.weight.shape:
            raise ValueError(f"DCDConv2d: static weight shape {tuple(weight.shape)} != {tuple(self.weight.shape)}")
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None and self.bias is not None:
                self.bias.copy_(bias)

    # ----------------------------------------------------------------------------------------------
    def coefficients(self, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Lambda (B x C_out, or None) and Phi (B x nb x L x L[*L_k], or None) of the dynamic branch."""
        b = x.shape[0]
        h, w, k = x.shape[2], x.shape[3], self.pool
        if k == 1:
            ctx = x.mean((2, 3))
        elif h % k == 0 and w % k == 0:  # same as adaptive pooling, faster
            ctx = x.reshape(b, self.in_channels, k, h // k, k, w // k).mean((3, 5)).reshape(b, -1)
        else:
            ctx = F.adaptive_avg_pool2d(x, k).reshape(b, -1)
        out = self.fc2(branch_hidden(self.fc1, self.gate, ctx))
        lam = phi = None
        start = 0
        if self.use_lambda:
            lam = lambda_activation(out[:, : self.out_channels])
            start = self.out_channels
        if self.use_phi:
            raw = out[:, start:]
            if self.form == "depthwise":
                phi = raw.reshape(b, 1, self.latent_kernel, self.latent_kernel)
            elif self.form == "joint":
                phi = raw.reshape(b, self.num_blocks, self.latent, self.latent * self.latent_kernel)
            else:
                phi = raw.reshape(b, self.num_blocks, self.latent, self.latent)
        return lam, phi

    def _released_affine(self, phi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode released residual as an affine map of the centre samples.

        ``BN2(Phi BN1(Q^T x)) + BN1(Q^T x) = M (s1 Q^T x + c1) + c2`` with ``M = I + diag(s2) Phi``:
        returns the per-sample ``M diag(s1) Q^T`` (B x nb x L x C_b) and ``M c1 + c2`` (B x nb x L).
        """
        assert self.bn_q is not None and self.bn_phi is not None
        nb, L = self.num_blocks, self.latent
        s1, c1 = batchnorm_affine(self.bn_q)
        s2, c2 = batchnorm_affine(self.bn_phi)
        m = s2.reshape(nb, L, 1) * phi + torch.eye(L, dtype=phi.dtype, device=phi.device)
        q = s1.reshape(nb, L, 1) * self.Q.reshape(nb, L, -1)
        shift = torch.matmul(m, c1.reshape(nb, L, 1)).squeeze(-1) + c2.reshape(nb, L)
        return torch.matmul(m, q), shift

    def _residual_weight(self, phi: torch.Tensor) -> torch.Tensor:
        """Per-sample dynamic residual as a B x C_out x C_in/g x kh x kw tensor (reference form)."""
        b = phi.shape[0]
        kh, kw = self.kernel_size
        cin_g = self.in_channels // self.groups
        if self.form == "depthwise":
            res = torch.einsum("oi,bij,tj->bot", self.P, phi[:, 0], self.R)
            return res.reshape(b, self.out_channels, 1, kh, kw)
        nb, L = self.num_blocks, self.latent
        cb = self.in_channels // nb
        ob = self.out_channels // nb
        P = self.P.reshape(nb, ob, L)
        Q = self.Q.reshape(nb, L, cb)
        fused = self._released_affine(phi)[0] if self.variant == "released" else None
        res = phi.new_zeros(b, self.out_channels, cin_g, kh, kw)
        for n in range(nb):
            col = (n % self.blocks) * cb
            rows = slice(n * ob, (n + 1) * ob)
            if self.form == "joint":
                core = phi[:, n].reshape(b, L, L, self.latent_kernel)
                block = torch.einsum("oi,bijl,jc,lt->boct", P[n], core, Q[n], self.R)
                res[:, rows, col:col + cb] = block.reshape(b, ob, cb, kh, kw)
            elif fused is not None:
                res[:, rows, col:col + cb, kh // 2, kw // 2] = torch.einsum("oi,bic->boc", P[n], fused[:, n])
            else:
                block = torch.einsum("oi,bij,jc->boc", P[n], phi[:, n], Q[n])
                res[:, rows, col:col + cb, kh // 2, kw // 2] = block
        return res

    def _check_foldable(self) -> None:
        if self.variant == "released" and self.bn_q is not None and uses_batch_stats(self.bn_q):
            raise ValueError("DCDConv2d: variant=released has a per-sample weight in eval mode only (its residual "
                             "BatchNorms use batch statistics in training); call .eval() or use path='branch'")

    def dynamic_weight(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample effective weight ``W(x)`` (B x C_out x C_in/g x kh x kw), Eq. 6-9 (reference form).

        Released variant: eval mode only (see :meth:`dynamic_bias` for its per-sample bias).
        """
        self._check_foldable()
        return self._synthesized(*self.coefficients(x)).expand(x.shape[0], *self.weight.shape)

    def dynamic_bias(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample bias (B x C_out) that goes with :meth:`dynamic_weight`, or None.

        Paper variant: the static bias. Released variant (eval): ``Lambda b + P (M c1 + c2)``.
        """
        self._check_foldable()
        lam, phi = self.coefficients(x)
        return self._synthesized_bias(lam, phi, x.shape[0])

    def _synthesized_bias(self, lam: Optional[torch.Tensor], phi: Optional[torch.Tensor],
                          batch: int) -> Optional[torch.Tensor]:
        if self.variant != "released":
            return None if self.bias is None else self.bias.unsqueeze(0).expand(batch, -1)
        bias = None
        if self.bias is not None:
            bias = self.bias.unsqueeze(0).expand(batch, -1)
            if lam is not None:
                bias = bias * lam
        if phi is not None:
            nb, L = self.num_blocks, self.latent
            shift = self._released_affine(phi)[1]  # B x nb x L
            extra = torch.matmul(self.P.reshape(nb, -1, L), shift.unsqueeze(-1)).reshape(batch, self.out_channels)
            bias = extra if bias is None else bias + extra
        return bias

    def _centre_samples(self, x: torch.Tensor, out_hw: Tuple[int, int]) -> torch.Tensor:
        """Input values at the centre tap of every output window (the 1x1 residual's input).

        Output position i reads input ``s * i + d * (k // 2) - p``; when every such position lies
        inside the input (e.g. 'same' padding) this is a plain strided view, otherwise the input is
        zero-padded first.
        """
        kh, kw = self.kernel_size
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        oh, ow = dh * (kh // 2) - ph, dw * (kw // 2) - pw
        h, w = x.shape[2], x.shape[3]
        if oh < 0 or ow < 0 or oh + sh * (out_hw[0] - 1) >= h or ow + sw * (out_hw[1] - 1) >= w:
            x = F.pad(x, (pw, pw, ph, ph))
            oh, ow = oh + ph, ow + pw
        if (oh, ow, sh, sw) == (0, 0, 1, 1) and tuple(x.shape[2:]) == tuple(out_hw):
            return x
        return x[:, :, oh: oh + sh * (out_hw[0] - 1) + 1: sh, ow: ow + sw * (out_hw[1] - 1) + 1: sw]

    def _synthesized(self, lam: Optional[torch.Tensor], phi: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-sample ``W(x)`` (B x C_out x C_in/g x kh x kw) from the dynamic branch's outputs."""
        w = self.weight.unsqueeze(0)
        if lam is not None:
            w = w * lam[:, :, None, None, None]
        if phi is not None:
            w = w + self._residual_weight(phi)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 6-9. Paths (``self.path``): ``branch`` adds the low-rank residual to the static conv's
        output; ``fold`` synthesizes ``W(x)`` and runs one (grouped-by-sample) conv; ``auto`` (default)
        folds at batch 1 and for depthwise layers (where ``W(x)`` is as small as a static depthwise
        weight) and uses the branch otherwise. The released variant folds in eval mode only."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"DCDConv2d: expected input B x {self.in_channels} x H x W, got {tuple(x.shape)}")
        if self.path not in PATHS:
            raise ValueError(f"DCDConv2d: path must be one of {', '.join(PATHS)}, got {self.path!r}")
        if self.variant == "released":
            return self._forward_released(x)
        lam, phi = self.coefficients(x)
        b = x.shape[0]
        fold = self.path == "fold" or (self.path == "auto" and (b == 1 or self.form == "depthwise"))
        if fold or self.form == "depthwise":
            w = self._synthesized(lam, phi)
            if b == 1:
                return F.conv2d(x, w[0], self.bias, groups=self.groups, **self.conv_kwargs())
            bias = None if self.bias is None else self.bias.repeat(b)
            y = F.conv2d(x.reshape(1, b * self.in_channels, *x.shape[2:]), w.reshape(-1, *w.shape[2:]), bias,
                         groups=b * self.groups, **self.conv_kwargs())
            return y.reshape(b, self.out_channels, *y.shape[2:])
        y = F.conv2d(x, self.weight, None, groups=self.groups, **self.conv_kwargs())
        inplace = not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))
        if lam is not None:
            if self.bias is not None:
                y = torch.addcmul(self.bias[:, None, None], y, lam[:, :, None, None])
            else:
                y = y.mul_(lam[:, :, None, None]) if inplace else y * lam[:, :, None, None]
        elif self.bias is not None:
            y = y.add_(self.bias[:, None, None]) if inplace else y + self.bias[:, None, None]
        if phi is None:
            return y
        nb, L = self.num_blocks, self.latent
        out_hw = (y.shape[2], y.shape[3])
        hw = out_hw[0] * out_hw[1]
        cb = self.in_channels // nb
        if self.form == "joint":
            z = F.conv2d(x, self.Q, groups=nb)
            kh, kw = self.kernel_size
            rk = self.R.reshape(1, self.latent_kernel, kh, kw).expand(nb * L, -1, -1, -1)
            z = F.conv2d(z, rk.reshape(nb * L * self.latent_kernel, 1, kh, kw), groups=nb * L, **self.conv_kwargs())
            z = torch.matmul(phi, z.reshape(b, nb, L * self.latent_kernel, hw))  # Phi: joint fusion
        else:
            # (Phi_b Q_b^T) is a tiny L x C_b matrix per sample: one batched matmul gives Phi Q^T x.
            fused = torch.matmul(phi, self.Q.reshape(nb, L, cb))
            z = torch.matmul(fused, self._centre_samples(x, out_hw).reshape(b, nb, cb, hw))
        ob = self.out_channels // nb
        p = self.P.reshape(1, nb, ob, L).expand(b, nb, ob, L).reshape(b * nb, ob, L)
        # Lambda (W0 * x) + b + P (Phi Q^T x): the residual is accumulated into y by baddbmm.
        # Under autocast y, z and P may differ in dtype (autocast leaves in-place ops alone): use y's.
        return _add_low_rank(y, p.to(y.dtype), z.reshape(b * nb, L, hw).to(y.dtype))

    def _forward_released(self, x: torch.Tensor) -> torch.Tensor:
        """The release: ``Lambda (W0 x + b) + P (BN2(Phi BN1(Q^T x_c)) + BN1(Q^T x_c))``."""
        lam, phi = self.coefficients(x)
        b = x.shape[0]
        batch_stats = self.bn_q is not None and uses_batch_stats(self.bn_q)
        if self.path == "fold" and batch_stats:
            self._check_foldable()
        if self.path == "fold" or (self.path == "auto" and b == 1 and not batch_stats):
            w = self._synthesized(lam, phi)
            bias = self._synthesized_bias(lam, phi, b)
            if b == 1:
                return F.conv2d(x, w[0], None if bias is None else bias[0], groups=self.groups, **self.conv_kwargs())
            y = F.conv2d(x.reshape(1, b * self.in_channels, *x.shape[2:]), w.reshape(-1, *w.shape[2:]),
                         None if bias is None else bias.reshape(-1), groups=b * self.groups, **self.conv_kwargs())
            return y.reshape(b, self.out_channels, *y.shape[2:])
        y = F.conv2d(x, self.weight, self.bias, groups=self.groups, **self.conv_kwargs())
        if lam is not None:
            y = y * lam[:, :, None, None]
        if phi is None:
            return y
        assert self.bn_q is not None and self.bn_phi is not None
        nb, L = self.num_blocks, self.latent
        out_hw = (y.shape[2], y.shape[3])
        hw = out_hw[0] * out_hw[1]
        cb = self.in_channels // nb
        centre = self._centre_samples(x, out_hw)
        if batch_stats:
            z = self.bn_q(F.conv2d(centre, self.Q, groups=nb))  # B x nb*L x H x W
            u = torch.matmul(phi, z.reshape(b, nb, L, hw)).reshape_as(z)
            z = self.bn_phi(u) + z
        else:
            fused, shift = self._released_affine(phi)
            z = torch.matmul(fused, centre.reshape(b, nb, cb, hw)) + shift.unsqueeze(-1)
        ob = self.out_channels // nb
        p = self.P.reshape(1, nb, ob, L).expand(b, nb, ob, L).reshape(b * nb, ob, L)
        # y is a fresh tensor no backward saved (conv and the Lambda product save their inputs only)
        return _add_low_rank(y, p.to(y.dtype), z.reshape(b * nb, L, hw).to(y.dtype))

    @torch.no_grad()
    def fold_output_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Fold a following per-output-channel affine map (an eval-mode BatchNorm), exactly (DCD, ICLR 2021,
        Eq. 6-9): ``scale (Lambda W0 + P Phi Q^T [R]) = Lambda (scale W0) + (scale P) Phi Q^T [R]`` and
        ``bias' = scale bias + shift`` (a bias is created when absent)."""
        self.weight.mul_(scale.to(self.weight).view(-1, 1, 1, 1))
        if getattr(self, "P", None) is not None:
            self.P.mul_(scale.to(self.P).view(-1, *([1] * (self.P.dim() - 1))))
        bias = shift if self.bias is None else self.bias * scale + shift
        self.bias = nn.Parameter(bias.detach().to(self.weight).clone())

    def analysis_coefficients(self, x: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
        """``Lambda`` (B x C_out) and ``Phi`` (B x L^2 ...), the present ones (DCD, ICLR 2021, Eq. 6)."""
        return coefficient_table(*self.coefficients(x))

    def export_route(self) -> ExportRoute:
        """Export: the ``branch`` path; depthwise layers through :class:`~.protocol.PerSampleUnfoldConv2d`."""
        if self.form == "depthwise":
            return ExportRoute(adapter=PerSampleUnfoldConv2d, label="unfold (per-sample weight)")
        return ExportRoute(path="branch", label="branch")

    def synthesis_macs(self) -> int:
        """MACs of synthesising the per-sample dynamic residual ``P Phi Q^T`` (DCD, ICLR 2021, Eq. 6-8).

        Channel fusion: ``L^2 C_in + C_out L C_in / n_b`` (``n_b`` diagonal blocks, Eq. 7), times
        ``L_k`` in the joint form (Eq. 8); depthwise form: the per-sample ``C x k^2`` weight ``C k^2
        (Lambda) + C L_k^2 + C L_k k^2``. DCD Table 3b counts the residual's synthesis, not its application
        to activations. The MAC counter adds the static conv of the geometry and the dynamic branch's
        Linears (counted as they run).
        """
        lam, phi = self.use_lambda, self.use_phi
        kh, kw = self.kernel_size
        if self.form == "depthwise":
            lk = self.latent_kernel
            return self.out_channels * kh * kw * lam + phi * self.out_channels * (lk * lk + lk * kh * kw)
        residual = (self.latent * self.latent * self.in_channels
                    + self.out_channels * self.latent * self.in_channels // self.num_blocks)
        if self.form == "joint":
            residual *= self.latent_kernel
        return residual * phi

    @classmethod
    def dynamic_classifier(cls, spec: ConvSpec, linear: nn.Linear) -> nn.Module:
        """Placement ``+cls``: :class:`DCDLinear` (DCD's dynamic classifier, Table 3b 'CLS') with the spec's
        options that apply to it."""
        accepted = inspect.signature(DCDLinear.__init__).parameters
        return DCDLinear.from_linear(linear, **{k: v for k, v in spec.options.items() if k in accepted})

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"form={self.form}", f"latent={self.latent}"]
        if self.latent_kernel:
            parts.append(f"latent_kernel={self.latent_kernel}")
        parts += [f"blocks={self.blocks}", f"pool={self.pool}", f"hidden={self.hidden}",
                  f"lambda={self.use_lambda}", f"phi={self.use_phi}"]
        if self.variant != "paper" or self.sizing != "paper":
            parts += [f"variant={self.variant}", f"sizing={self.sizing}"]
        return ", ".join(parts)

