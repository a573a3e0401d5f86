"""DCD: dynamic convolution decomposition (Li et al., ICLR 2021, Eq. 6-9), and its dynamic classifier.

One operator, three forms chosen from the layer's geometry:

* **1x1 (and any k x k with** ``mode=channel`` **)**, Eq. 6/7:
  ``W(x) = Lambda(x) W0 + (+)_b P_b Phi_b(x) Q_b^T``. For a k x k kernel the residual is the paper's
  "channel fusion alone" (section 4.3, Figure 4b): R is one-hot at the centre tap, so the residual
  is a 1x1 dynamic convolution applied at the kernel centre.
* **k x k, ``mode=joint``**, Eq. 9: ``W(x) = W0 x_2 Lambda(x) + Phi(x) x_1 Q x_2 P x_3 R`` with a
  ``L x L x L_k`` core Phi (joint fusion of channels and kernel elements).
* **depthwise k x k** (``in_channels / groups == 1``), Eq. 8: ``W(x) = Lambda(x) W0 + P Phi(x) R^T``
  with W0 a ``C x k^2`` matrix and Phi an ``L_k x L_k`` fusion of latent kernel elements.

Lambda is a diagonal (output-channel) attention, Phi the dynamic fusion matrix; both come from one
light dynamic branch (section 3.4): context pooling -> FC(C_ctx -> s) -> ReLU -> FC(s -> C_out +
#Phi), no biases. Lambda uses the authors' ``relu6(z + 3) / 3`` (range [0, 2], 1 at z = 0), so a
layer seeded with a static weight starts close to it; Phi is linear.

Sizes (``C_b = in_channels / (groups * blocks)``, defaults when the option is 0):

* latent L, 1x1: ``floor(C_b / 2^floor(log2 sqrt(C_b)))`` (section 3.2); joint: the same formula on
  ``C_b / L_k`` (section 4.3); k x k channel fusion alone: ``floor(sqrt(pool^2 * C_b))`` with a 2x2
  pooled context, as in the authors' ResNet-18 release (the paper only says "increase L
  accordingly"; this choice reproduces its 14.0M ResNet-18 count);
* ``L_k = floor(k^2 / 2)`` (sections 4.2, 4.3);
* generator hidden width ``s = max(4, C_in * pool^2 // reduction)`` ("the first FC layer reduces the
  number of channels by r", section 3.4; r = 16).

Parameters beyond the static ``C_out * C_in/g * k^2`` (+ bias): ``P``: ``C_out * L``, ``Q``:
``C_in * L`` (joint adds ``R``: ``L_k * k^2``; depthwise has ``P``: ``C_out * L_k`` and ``R``:
``k^2 * L_k`` instead), generator ``C_in * pool^2 * s + s * (C_out + #Phi)`` where
``#Phi = groups * blocks * L^2`` (joint: ``* L_k``; depthwise: ``L_k^2``). Dropping Lambda removes
``s * C_out``; dropping Phi removes P, Q, R and ``s * #Phi``.

Whole models with these defaults (torchvision definitions, every conv inside the residual blocks /
every 1x1 conv of MobileNetV2 dynamic): ResNet-18 14.50M (the paper's 14.0M counts its static
model as 11.1M, i.e. without the 0.51M fc: 14.50 - 0.51 = 13.99M), ResNet-50 33.12M (paper 30.7M
without the 2.05M fc = 32.75M), MobileNetV2 5.33M (paper 5.5M), 5.73M with a ``DCDLinear``
classifier.

Execution (``module.path``, chosen automatically; set it to ``"branch"`` or ``"fold"`` to force one):

* ``branch`` (batch > 1, channel and joint forms): W(x) is never synthesized. The static conv runs,
  and ``P Phi Q^T x`` is computed on activations - Q^T on the centre-tap
  samples of the input (a strided view for 'same' padding), Phi applied in the latent space - both
  as one batched matmul with the per-sample ``L x C`` matrix ``Phi_b Q^T`` (joint form: a Q^T 1x1
  conv, a depthwise conv with the L_k kernels of R, then a batched Phi matmul) - and P's
  up-projection is accumulated into ``Lambda * conv(x, W0) + b`` by one ``baddbmm``.
* ``fold`` (batch 1, and depthwise layers at any batch): ``W(x)`` costs about as much as the static
  weight (for depthwise layers it is ``B x C x k^2``, the size of a static depthwise weight), so it
  is synthesized and applied in one conv (``groups = B * groups`` when B > 1) - at batch 1 DCD then
  costs one dense conv plus the dynamic branch.

Every path equals the per-sample reference ``F.conv2d(x_b, W(x)_b)`` with
:meth:`DCDConv2d.dynamic_weight` (tested to 1e-5, forward and backward).

The authors' release adds BatchNorm layers and an identity inside the residual branch; they are not
in the paper's equations and are left out here, so the operator is exactly Eq. 6-9.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import DynamicConv2d
from .registry import Option, register_operator

__all__ = ["DCDConv2d", "DCDLinear", "default_latent", "PATHS"]

PATHS = ("auto", "branch", "fold")


def default_latent(channels: int) -> int:
    """Paper default latent size ``floor(C / 2^floor(log2 sqrt(C)))`` (section 3.2), at least 1."""
    if channels <= 1:
        return 1
    return max(1, channels // 2 ** int(math.floor(math.log2(math.sqrt(channels)))))


def _lambda_act(z: torch.Tensor) -> torch.Tensor:
    """The authors' h-sigmoid for Lambda: ``relu6(z + 3) / 3`` in [0, 2], equal to 1 at z = 0."""
    return F.relu6(z + 3.0) / 3.0


@register_operator(
    "dcd",
    options={
        "mode": Option(str, "channel", "k x k form: 'channel' fusion alone (1x1 residual) or 'joint' (Eq. 9)",
                       choices=("channel", "joint")),
        "blocks": Option(int, 1, "B diagonal blocks of the dynamic residual (Eq. 7)", minimum=1),
        "latent": Option(int, 0, "latent size L (0 = paper default)", minimum=0),
        "latent_kernel": Option(int, 0, "latent kernel elements L_k (0 = floor(k^2/2))", minimum=0),
        "reduction": Option(int, 16, "reduction r of the dynamic branch's first FC", minimum=1),
        "pool": Option(int, 0, "context pooling grid (0 = auto: 2 for k x k channel fusion, else 1)", minimum=0),
        "components": Option("set", ("lambda", "phi"), "dynamic parts kept (Table 1 ablation)",
                             choices=("lambda", "phi")),
    },
    help="DCD (Li et al. 2021): Lambda(x) W0 + P Phi(x) Q^T",
)
class DCDConv2d(DynamicConv2d):
    """Dynamic convolution decomposition, Eq. 6-9 of Li et al. (2021); see the module docstring."""

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
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        if mode not in ("channel", "joint"):
            raise ValueError(f"DCDConv2d: mode must be 'channel' or 'joint', got {mode!r}")
        for name, value, low in (("blocks", blocks, 1), ("latent", latent, 0), ("latent_kernel", latent_kernel, 0),
                                 ("reduction", reduction, 1), ("pool", pool, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"DCDConv2d: {name} must be an integer >= {low}, got {value!r}")
        components = tuple(components)
        bad = [c for c in components if c not in ("lambda", "phi")]
        if bad or not components:
            raise ValueError(f"DCDConv2d: components must be a non-empty subset of lambda/phi, got {components!r}")
        self.use_lambda = "lambda" in components
        self.use_phi = "phi" in components
        kh, kw = self.kernel_size
        taps = kh * kw
        cin_g = in_channels // groups
        cout_g = out_channels // groups
        if cin_g == 1 and taps > 1:
            form = "depthwise"
        elif taps == 1 or mode == "channel":
            form = "channel"
        else:
            form = "joint"
        self.form = form
        self.mode = mode
        self.path = "auto"  # execution path, see forward(); set to "branch" or "fold" to force one
        self.weight = nn.Parameter(torch.empty(out_channels, cin_g, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None

        self.blocks = blocks if form != "depthwise" else 1  # Eq. 7 splits channels; Eq. 8 fuses taps
        self.num_blocks = groups * self.blocks if form != "depthwise" else 1
        if form != "depthwise" and (cin_g % self.blocks or cout_g % self.blocks):
            raise ValueError(
                f"DCDConv2d: blocks ({blocks}) must divide in_channels/groups ({cin_g}) and out_channels/groups ({cout_g})"
            )
        self.pool = pool or (2 if form == "channel" and taps > 1 else 1)
        cb = in_channels // self.num_blocks if form != "depthwise" else in_channels
        self.latent_kernel = 0
        if form in ("joint", "depthwise"):
            self.latent_kernel = latent_kernel or taps // 2
            if self.latent_kernel >= taps + 1 or self.latent_kernel < 1:
                raise ValueError(f"DCDConv2d: latent_kernel must be in 1..{taps}, got {self.latent_kernel}")
        if form == "depthwise":
            self.latent = self.latent_kernel
            n_phi = self.latent_kernel ** 2
        elif form == "joint":
            self.latent = latent or default_latent(max(1, cb // self.latent_kernel))
            n_phi = self.num_blocks * self.latent ** 2 * self.latent_kernel
        else:
            if latent:
                self.latent = latent
            elif taps > 1:
                self.latent = max(1, int(math.isqrt(self.pool ** 2 * cb)))
            else:
                self.latent = default_latent(cb)
            n_phi = self.num_blocks * self.latent ** 2
        if not self.use_phi:
            n_phi = 0
        self.n_phi = n_phi
        n_lambda = out_channels if self.use_lambda else 0
        ctx = in_channels * self.pool ** 2
        self.hidden = max(4, ctx // reduction)
        self.fc1 = nn.Linear(ctx, self.hidden, bias=False)
        self.fc2 = nn.Linear(self.hidden, n_lambda + n_phi, bias=False)
        L, Lk = self.latent, self.latent_kernel
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
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        for name in ("P", "Q", "R"):
            param = getattr(self, name, None)
            if param is not None:
                fan_in = param.shape[1] * (param[0, 0].numel() if param.dim() > 2 else 1)
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(param, -bound, bound)

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
        out = self.fc2(F.relu(self.fc1(ctx)))
        lam = phi = None
        start = 0
        if self.use_lambda:
            lam = _lambda_act(out[:, : self.out_channels])
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
        res = phi.new_zeros(b, self.out_channels, cin_g, kh, kw)
        for n in range(nb):
            col = (n % self.blocks) * cb
            rows = slice(n * ob, (n + 1) * ob)
            if self.form == "joint":
                core = phi[:, n].reshape(b, L, L, self.latent_kernel)
                block = torch.einsum("oi,bijl,jc,lt->boct", P[n], core, Q[n], self.R)
                res[:, rows, col:col + cb] = block.reshape(b, ob, cb, kh, kw)
            else:
                block = torch.einsum("oi,bij,jc->boc", P[n], phi[:, n], Q[n])
                res[:, rows, col:col + cb, kh // 2, kw // 2] = block
        return res

    def dynamic_weight(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample effective weight ``W(x)`` (B x C_out x C_in/g x kh x kw), Eq. 6-9 (reference form)."""
        return self._synthesized(*self.coefficients(x)).expand(x.shape[0], *self.weight.shape)

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
        weight) and uses the branch otherwise."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"DCDConv2d: expected input B x {self.in_channels} x H x W, got {tuple(x.shape)}")
        if self.path not in PATHS:
            raise ValueError(f"DCDConv2d: path must be one of {', '.join(PATHS)}, got {self.path!r}")
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
        # In place: y is a fresh tensor that no backward formula saved, and baddbmm's own backward
        # needs only p and z, so this is autograd-safe and spares a copy of the output.
        # Under autocast y, z and P may differ in dtype (autocast leaves in-place ops alone): use y's.
        y.reshape(b * nb, ob, hw).baddbmm_(p.to(y.dtype), z.reshape(b * nb, L, hw).to(y.dtype))
        return y

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"form={self.form}", f"latent={self.latent}"]
        if self.latent_kernel:
            parts.append(f"latent_kernel={self.latent_kernel}")
        parts += [f"blocks={self.blocks}", f"pool={self.pool}", f"hidden={self.hidden}",
                  f"lambda={self.use_lambda}", f"phi={self.use_phi}"]
        return ", ".join(parts)


class DCDLinear(nn.Module):
    """Dynamic classifier ('CLS' in DCD Table 3b): a drop-in for nn.Linear, Eq. 6 on a 1x1 input.

    ``y = Lambda(x) * (W0 x) + b + P Phi(x) Q^T x`` with the dynamic branch FC(in -> s) -> ReLU ->
    FC(s -> out + L^2), ``s = max(4, in // reduction)`` and ``L`` the paper default
    (512 features -> L = 32, s = 32, as in the authors' classifier).
    Extra parameters: ``in*L + L*out + in*s + s*(out + L^2)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        latent: int = 0,
        reduction: int = 16,
        components: Tuple[str, ...] = ("lambda", "phi"),
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("reduction", reduction)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DCDLinear: {name} must be a positive integer, got {value!r}")
        if not isinstance(latent, int) or latent < 0:
            raise ValueError(f"DCDLinear: latent must be an integer >= 0, got {latent!r}")
        components = tuple(components)
        if not components or any(c not in ("lambda", "phi") for c in components):
            raise ValueError(f"DCDLinear: components must be a non-empty subset of lambda/phi, got {components!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.use_lambda = "lambda" in components
        self.use_phi = "phi" in components
        self.latent = latent or default_latent(in_features)
        n_phi = self.latent ** 2 if self.use_phi else 0
        self.hidden = max(4, in_features // reduction)
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.fc1 = nn.Linear(in_features, self.hidden, bias=False)
        self.fc2 = nn.Linear(self.hidden, (out_features if self.use_lambda else 0) + n_phi, bias=False)
        if self.use_phi:
            self.Q = nn.Linear(in_features, self.latent, bias=False)
            self.P = nn.Linear(self.latent, out_features, bias=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.linear.bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> DCDLinear:
        """Build from a static nn.Linear, which becomes W0 (and the bias)."""
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **options)
        module.load_static_weight(linear.weight.detach(), None if linear.bias is None else linear.bias.detach())
        return module.to(device=linear.weight.device, dtype=linear.weight.dtype)

    def load_static_weight(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            if bias is not None and self.linear.bias is not None:
                self.linear.bias.copy_(bias)

    def coefficients(self, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        out = self.fc2(F.relu(self.fc1(x)))
        lam = _lambda_act(out[:, : self.out_features]) if self.use_lambda else None
        phi = out[:, self.out_features if self.use_lambda else 0:].reshape(-1, self.latent, self.latent) if self.use_phi else None
        return lam, phi

    def dynamic_weight(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample ``W(x) = Lambda W0 + P Phi Q^T`` (B x out x in)."""
        lam, phi = self.coefficients(x)
        w = self.linear.weight.unsqueeze(0).expand(x.shape[0], -1, -1)
        if lam is not None:
            w = w * lam[:, :, None]
        if phi is not None:
            w = w + torch.einsum("oi,bij,jc->boc", self.P.weight, phi, self.Q.weight)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"DCDLinear: expected input B x {self.in_features}, got {tuple(x.shape)}")
        lam, phi = self.coefficients(x)
        y = F.linear(x, self.linear.weight)
        if lam is not None:
            y = y * lam
        if phi is not None:
            y = y + self.P(torch.bmm(phi, self.Q(x).unsqueeze(2)).squeeze(2))
        if self.linear.bias is not None:
            y = y + self.linear.bias
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, latent={self.latent}, hidden={self.hidden}, "
                f"lambda={self.use_lambda}, phi={self.use_phi}")
