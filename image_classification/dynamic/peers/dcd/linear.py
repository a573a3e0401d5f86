"""DCD's dynamic classifier ('CLS' in DCD, ICLR 2021, Table 3b): Eq. 6 on a 1x1 input, as written or as the
release's ``DYCls``."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...functional import batchnorm_affine
from ...protocol import OperatorProtocol
from .common import VARIANTS, branch_hidden, coefficient_table, lambda_activation, uses_batch_stats
from .sizes import RELEASED_CLASSIFIER_WIDTH, default_latent

__all__ = ["DCDLinear"]


class DCDLinear(nn.Module, OperatorProtocol):
    """Dynamic classifier ('CLS' in DCD Table 3b): a drop-in for nn.Linear, Eq. 6 on a 1x1 input.

    ``y = Lambda(x) * (W0 x) + b + P Phi(x) Q^T x`` with the dynamic branch FC(in -> s) -> ReLU ->
    FC(s -> out + L^2), ``s = max(4, in // reduction)`` and ``L`` the paper default
    (512 features -> L = 32, s = 32, as in the authors' classifier).
    Extra parameters: ``in*L + L*out + in*s + s*(out + L^2)``.

    ``variant=released`` is the release's ``DYCls``: ``y = Lambda (W0 x + b) + P (BN2(Phi BN1(Q^T x))
    + BN1(Q^T x))``, the gated branch ``h * hsigmoid(G h)``, and L = s = 32 at any input width
    (docs/operators.md, "DCD as released", items 1, 2, 4, 5); ``reduction`` is then unused.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        latent: int = 0,
        reduction: int = 16,
        components: Tuple[str, ...] = ("lambda", "phi"),
        variant: str = "paper",
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("reduction", reduction)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DCDLinear: {name} must be a positive integer, got {value!r}")
        if not isinstance(latent, int) or latent < 0:
            raise ValueError(f"DCDLinear: latent must be an integer >= 0, got {latent!r}")
        if variant not in VARIANTS:
            raise ValueError(f"DCDLinear: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        components = tuple(components)
        if not components or any(c not in ("lambda", "phi") for c in components):
            raise ValueError(f"DCDLinear: components must be a non-empty subset of lambda/phi, got {components!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.variant = variant
        self.use_lambda = "lambda" in components
        self.use_phi = "phi" in components
        if variant == "released":
            self.latent = latent or RELEASED_CLASSIFIER_WIDTH
            self.hidden = RELEASED_CLASSIFIER_WIDTH
        else:
            self.latent = latent or default_latent(in_features)
            self.hidden = max(4, in_features // reduction)
        n_phi = self.latent ** 2 if self.use_phi else 0
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.fc1 = nn.Linear(in_features, self.hidden, bias=False)
        self.gate = nn.Linear(self.hidden, self.hidden, bias=False) if variant == "released" else None
        self.fc2 = nn.Linear(self.hidden, (out_features if self.use_lambda else 0) + n_phi, bias=False)
        self.bn_q: Optional[nn.BatchNorm1d] = None
        self.bn_phi: Optional[nn.BatchNorm1d] = None
        if self.use_phi:
            self.Q = nn.Linear(in_features, self.latent, bias=False)
            self.P = nn.Linear(self.latent, out_features, bias=False)
            if variant == "released":
                self.bn_q = nn.BatchNorm1d(self.latent)
                self.bn_phi = nn.BatchNorm1d(self.latent)

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
        out = self.fc2(branch_hidden(self.fc1, self.gate, x))
        lam = lambda_activation(out[:, : self.out_features]) if self.use_lambda else None
        phi_start = self.out_features if self.use_lambda else 0
        phi = out[:, phi_start:].reshape(-1, self.latent, self.latent) if self.use_phi else None
        return lam, phi

    def _released_affine(self, phi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Eval mode: ``M diag(s1) Q^T`` (B x L x in) and ``M c1 + c2`` (B x L), ``M = I + diag(s2) Phi``."""
        assert self.bn_q is not None and self.bn_phi is not None
        if uses_batch_stats(self.bn_q):
            raise ValueError("DCDLinear: variant=released has a per-sample weight in eval mode only (its BatchNorms "
                             "use batch statistics in training); call .eval()")
        s1, c1 = batchnorm_affine(self.bn_q)
        s2, c2 = batchnorm_affine(self.bn_phi)
        m = s2[:, None] * phi + torch.eye(self.latent, dtype=phi.dtype, device=phi.device)
        return torch.matmul(m, s1[:, None] * self.Q.weight), torch.matmul(m, c1) + c2

    def dynamic_weight(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample ``W(x) = Lambda W0 + P Phi Q^T`` (B x out x in); released variant: eval mode,
        ``Lambda W0 + P M diag(s1) Q^T`` (see :meth:`dynamic_bias`)."""
        lam, phi = self.coefficients(x)
        w = self.linear.weight.unsqueeze(0).expand(x.shape[0], -1, -1)
        if lam is not None:
            w = w * lam[:, :, None]
        if phi is not None:
            if self.variant == "released":
                w = w + torch.matmul(self.P.weight, self._released_affine(phi)[0])
            else:
                w = w + torch.einsum("oi,bij,jc->boc", self.P.weight, phi, self.Q.weight)
        return w

    def dynamic_bias(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample bias (B x out) going with :meth:`dynamic_weight`, or None."""
        if self.variant != "released":
            return None if self.linear.bias is None else self.linear.bias.unsqueeze(0).expand(x.shape[0], -1)
        lam, phi = self.coefficients(x)
        bias = None
        if self.linear.bias is not None:
            bias = self.linear.bias.unsqueeze(0).expand(x.shape[0], -1)
            bias = bias * lam if lam is not None else bias
        if phi is not None:
            extra = self.P(self._released_affine(phi)[1])
            bias = extra if bias is None else bias + extra
        return bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"DCDLinear: expected input B x {self.in_features}, got {tuple(x.shape)}")
        lam, phi = self.coefficients(x)
        if self.variant == "released":
            y = self.linear(x)
            if lam is not None:
                y = y * lam
            if phi is not None:
                assert self.bn_q is not None and self.bn_phi is not None
                z = self.bn_q(self.Q(x))
                z = self.bn_phi(torch.bmm(phi, z.unsqueeze(2)).squeeze(2)) + z
                y = y + self.P(z)
            return y
        y = F.linear(x, self.linear.weight)
        if lam is not None:
            y = y * lam
        if phi is not None:
            y = y + self.P(torch.bmm(phi, self.Q(x).unsqueeze(2)).squeeze(2))
        if self.linear.bias is not None:
            y = y + self.linear.bias
        return y

    def analysis_coefficients(self, x: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
        """``Lambda`` and ``Phi`` of the dynamic classifier for ``x``, the present ones."""
        return coefficient_table(*self.coefficients(x))

    def macs(self, input_shape: Sequence[int]) -> int:
        """``rows (in out + L^2 + every other Linear's in out)``: ``W0 x``, the ``L x L`` fusion ``Phi (Q^T x)``
        and the dynamic branch, P and Q, each run once per row (``rows`` = all leading dims)."""
        rows = 1
        for size in input_shape[:-1]:
            rows *= int(size)
        branch = sum(m.in_features * m.out_features for name, m in self.named_children()
                     if isinstance(m, nn.Linear) and name != "linear")
        fusion = self.latent * self.latent if self.use_phi else 0
        return rows * (self.in_features * self.out_features + fusion + branch)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, latent={self.latent}, hidden={self.hidden}, "
                f"lambda={self.use_lambda}, phi={self.use_phi}, variant={self.variant}")
