"""What DCD's conv and classifier share: the variants, Lambda's activation, the dynamic branch's first stage and
the coefficient table of the analysis tools (DCD, ICLR 2021, Sec. 3.4; the release's gate: docs/operators.md)."""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["VARIANTS", "branch_hidden", "coefficient_table", "lambda_activation", "uses_batch_stats"]

#: ``paper``: Eq. 6-9 as written; ``released``: the authors' code
VARIANTS = ("paper", "released")


def lambda_activation(z: torch.Tensor) -> torch.Tensor:
    """The authors' h-sigmoid for Lambda: ``relu6(z + 3) / 3`` in [0, 2], equal to 1 at z = 0."""
    return F.relu6(z + 3.0) / 3.0


def uses_batch_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether ``bn`` normalises with the batch's statistics (training, or no running statistics)."""
    return bn.training or bn.running_mean is None


def branch_hidden(fc1: nn.Linear, gate: Optional[nn.Linear], ctx: torch.Tensor) -> torch.Tensor:
    """First stage of the dynamic branch: ReLU(FC1 ctx) (paper), or the release's SE-like gate
    ``h * hsigmoid(G h)`` with ``h = FC1 ctx``."""
    h = fc1(ctx)
    return F.relu(h) if gate is None else h * lambda_activation(gate(h))


def coefficient_table(lam: Optional[torch.Tensor], phi: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``{"lambda": B x C_out, "Phi": B x #Phi}`` of the present coefficients (the analysis tools' input)."""
    out = {}
    if lam is not None:
        out["lambda"] = lam.reshape(lam.shape[0], -1)
    if phi is not None:
        out["Phi"] = phi.reshape(phi.shape[0], -1)
    return out
