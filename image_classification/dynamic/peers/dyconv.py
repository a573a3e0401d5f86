"""DY-Conv (Chen et al., CVPR 2020): attention over K convolution kernels, Eq. 1 of the DCD paper.

``W(x) = sum_k pi_k(x) W_k``, ``b(x) = sum_k pi_k(x) b_k`` with ``pi(x) = softmax(z(x) / tau)`` and
``z(x) = FC(ReLU(FC(GAP(x))))`` (hidden width ``max(min_hidden, C_in // reduction)``, reduction 4).

Temperature schedule. The DY-Conv paper (Chen et al., CVPR 2020, Sec. 3.2 "near-uniform attention in
early training epochs" and its ImageNet setup) anneals tau linearly from 30 to 1 over the first 10
epochs; it does not say whether tau moves per iteration or per epoch, nor whether "1" is reached
during the 10th epoch or when it ends. Here tau is set once per epoch, at its start, by the trainer
(:meth:`set_epoch`, epochs 0-based): ``tau_e = 30 - 29 * min(e, 10) / 10``, so epochs 0..9 train
with tau = 30, 27.1, 24.2, ..., 3.9 and **tau reaches 1 at the start of epoch 10 (0-based), i.e.
after 10 full epochs of annealing** - the "after 10 epochs" reading of the paper. (The other
reading, tau = 1 already during the 10th epoch, would step by 29/9 and is not what runs.)
``anneal_epochs`` and ``temperature`` change the 10 and the 30. tau is a persistent buffer, so a
saved model evaluates with the temperature it was trained to.

Parameters: ``K * (C_out * C_in/g * k^2 [+ C_out])`` kernels plus the attention
``C_in * h + h + h * K + K`` (``h`` the hidden width).

:class:`~.kernel_mixture.KernelMixtureConv2d` is the shared execution (CondConv reuses it with
sigmoid routing).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import Option, register_operator
from .kernel_mixture import KernelMixtureConv2d

__all__ = ["DyConv2d"]


@register_operator(
    "dyconv",
    options={
        "k": Option(int, 4, "number of kernels K", minimum=1),
        "reduction": Option(int, 4, "attention FC reduction ratio", minimum=1),
        "min_hidden": Option(int, 4, "smallest attention hidden width", minimum=1),
        "temperature": Option(float, 30.0, "initial softmax temperature", minimum=1e-6),
        "anneal_epochs": Option(int, 10, "epochs to anneal the temperature linearly to 1 (0 = keep it)", minimum=0),
    },
    help="DY-Conv (Chen et al. 2020): softmax attention over K kernels, temperature annealed 30 -> 1",
)
class DyConv2d(KernelMixtureConv2d):
    """DY-Conv (Chen et al., 2020): ``W(x) = sum_k softmax(z(x) / tau)_k W_k``."""

    temperature: torch.Tensor  # buffer: tau, annealed per epoch (:meth:`schedule`)

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
        k: int = 4,
        reduction: int = 4,
        min_hidden: int = 4,
        temperature: float = 30.0,
        anneal_epochs: int = 10,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_kernels=k)
        self.check_options(reduction=reduction, min_hidden=min_hidden, temperature=temperature,
                           anneal_epochs=anneal_epochs)
        self.hidden = max(min_hidden, in_channels // reduction)
        self.fc1 = nn.Linear(in_channels, self.hidden)
        self.fc2 = nn.Linear(self.hidden, k)
        self.initial_temperature = float(temperature)
        self.anneal_epochs = anneal_epochs
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    @staticmethod
    def schedule(epoch: int, initial: float = 30.0, anneal_epochs: int = 10) -> float:
        """Temperature at the start of ``epoch`` (0-based): linear from ``initial`` to 1 over ``anneal_epochs``.

        ``schedule(0) == initial``, ``schedule(anneal_epochs - 1) == 1 + (initial - 1) / anneal_epochs``
        (3.9 for 30 over 10), and 1 from ``schedule(anneal_epochs)`` on: tau reaches 1 after
        ``anneal_epochs`` full epochs (module docstring).
        """
        if anneal_epochs <= 0:
            return float(initial)
        frac = min(max(epoch, 0), anneal_epochs) / anneal_epochs
        return float(initial + (1.0 - initial) * frac)

    def set_epoch(self, epoch: int) -> None:
        self.temperature.fill_(self.schedule(epoch, self.initial_temperature, self.anneal_epochs))

    @torch.no_grad()
    def fold_output_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Fold a following per-output-channel affine map (an eval-mode BatchNorm), exactly:
        ``scale sum_k pi_k W_k + shift = sum_k pi_k (scale W_k) + sum_k pi_k shift`` as the softmax weights
        sum to 1, so ``W_k *= scale`` and ``b_k = scale b_k + shift`` (biases created when absent)."""
        scale, shift = scale.to(self.weight), shift.to(self.weight)
        self.weight.mul_(scale.view(1, -1, 1, 1, 1))
        bias = shift.expand(self.num_kernels, -1) if self.bias is None else self.bias * scale + shift
        self.bias = nn.Parameter(bias.detach().clone())

    def attention_macs(self) -> int:
        """``C_in h + h K`` (the two attention FCs on the pooled input)."""
        return self.in_channels * self.hidden + self.hidden * self.num_kernels

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc2(F.relu(self.fc1(x.mean((2, 3)))))
        return torch.softmax(z / self.temperature.to(z.dtype), dim=1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden={self.hidden}, temperature={float(self.temperature):g}"
