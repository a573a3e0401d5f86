"""ODConv: omni-dimensional dynamic convolution (Li, Zhou & Yao, ICLR 2022).

ODConv paper Eq. 2 (Sec. 3.2)::

    y = (a_w1 * a_f1 * a_c1 * a_s1 * W_1 + ... + a_wn * a_fn * a_cn * a_sn * W_n) conv x

Each of the ``n`` kernels ``W_i`` (C_out x C_in/g x k x k) is modulated along all four dimensions of the
kernel space: ``a_s`` in R^{k x k} over the spatial positions, ``a_c`` in R^{C_in} over the input channels,
``a_f`` in R^{C_out} over the output filters and the scalar ``a_w`` over the kernels. The attentions come
from one multi-head SE-type branch (Sec. 3.2, "Implementation"): global average pooling ->
FC(C_in -> A) -> BatchNorm -> ReLU -> four heads FC(A -> k*k / C_in / C_out / n), a sigmoid on the first
three and a softmax over the ``n`` kernels for ``a_w``.

Details the paper leaves to its released code (OSVAI/ODConv ``modules/odconv.py``), followed here:

* ``A = max(int(C_in * reduction), 16)`` with ``reduction = 1/16`` (option ``reduction``, 0.0625); the FC
  before the BatchNorm has no bias, the heads have biases; weights Kaiming-normal (fan-out), biases 0;
* ``a_s``, ``a_c`` and ``a_f`` are shared by the ``n`` kernels (one head each; the kernel index on them in
  Eq. 2 is notation), which gives the published parameter counts;
* the spatial head is absent for 1x1 kernels, the filter head for depthwise convs (C_in == C_out ==
  groups) and the kernel head for ``n = 1``: each of those attentions is 1;
* all four heads divide their logits by a temperature that falls linearly from 30 to 1 over the first
  10 epochs (options ``temperature``/``anneal_epochs``; the released script steps it per iteration,
  here it is stepped per epoch by the trainer's :meth:`set_epoch`, as for DY-Conv). It is a persistent
  buffer, so a saved model evaluates at the temperature it was trained to.

``a_c`` over all C_in input channels is applied to the input (for grouped convs, input channel ``c``
of the filters of group ``c // (C_in/g)``), as the released code does.

Algebra behind the fast paths. With the three shared attentions,
``W(x) = a_f (.) a_c (.) K(x)`` where ``K(x) = a_s (.) sum_i a_wi W_i``, and since ``a_f`` scales output
channels and ``a_c`` input channels::

    conv(x, W(x)) = a_f * conv(a_c * x, K(x))

so only ``K(x)`` is per sample. For ``n = 1`` it is ``a_s (.) W`` (PEDConv's rank-1 form with
``psi = a_s``), and a 1x1 conv with ``n = 1`` is a dense conv between two channel scalings.

Execution paths (``path``; all equal ``reference`` to float rounding, tested in float64 with gradcheck):

* ``reference``   - per sample, ``F.conv2d`` with :meth:`ODConv2d.dynamic_weight` (the plain Eq. 2).
* ``materialize`` - ``K(x)`` per sample (B x C_out x C_in/g x k x k) in one grouped conv
  (``groups = B * groups``; a single dense conv at batch 1), activations scaled by ``a_c`` and ``a_f``.
* ``factored``    - no per-sample weight: for kernel ``i`` and tap ``t`` a 1x1 conv of the shifted input
  with ``W_i[:, :, t]``, weighted by ``a_wi * a_s[t]`` per sample (``n k^2`` dense 1x1 convs).
* ``unfold``      - ``F.unfold`` patches scaled by ``a_s`` per tap and one matmul with ``W`` (``n = 1``,
  no per-sample weight) or a batched matmul with the per-sample ``sum_i a_wi W_i`` (``n > 1``).
* ``auto`` (default): 1x1 with ``n = 1``: the dense conv; depthwise layers and batch 1: ``materialize``
  (one small per-sample weight, or one dense conv); otherwise ``materialize`` while the per-sample
  kernel is at most ``GROUPED_MAX_WEIGHT_RATIO`` times one output map (``C_out k^2 <= 16 H_out W_out``,
  as for PEDConv), ``unfold`` beyond.

``factored`` and ``unfold`` keep the batch a plain leading axis (no ``groups = B``), so they are the
paths an export with a dynamic batch axis uses (:meth:`ODConv2d.prepare_export`).

Parameters: ``n C_out C_in/g k^2`` kernels [+ C_out bias] plus the attention
``C_in A + 2 A + (A + 1)(C_in [+ C_out] [+ k^2] [+ n])`` (the BatchNorm's affine pair counted).
ResNet-18 (every conv of the residual blocks, shortcuts static): 11.94M with ``n = 1``, 44.90M with
``n = 4`` (ODConv Table 2 / released models: 11.94M, 44.90M).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..base import DynamicConv2d
from ..functional import per_sample_conv2d
from ..protocol import ExportRoute
from ..registry import Option, register_operator

__all__ = ["ODConv2d", "ODAttentions", "PATHS", "MIN_ATTENTION_CHANNELS", "GROUPED_MAX_WEIGHT_RATIO"]

PATHS: Tuple[str, ...] = ("auto", "reference", "materialize", "factored", "unfold")
#: floor of the attention width ``max(int(C_in * reduction), 16)`` (the released code's ``min_channel``)
MIN_ATTENTION_CHANNELS = 16
#: batch > 1, k x k kernels: grouped per-sample kernel while ``C_out k^2 <= ratio * H_out W_out``, else unfold
GROUPED_MAX_WEIGHT_RATIO = 16

_OPTIONS = {
    "k": Option(int, 1, "number of kernels n (the paper's ODConv 1x / 4x)", minimum=1),
    "reduction": Option(float, 0.0625, "attention width max(int(C_in * reduction), 16)", minimum=1e-9),
    "temperature": Option(float, 30.0, "initial temperature of the four attention heads", minimum=1e-6),
    "anneal_epochs": Option(int, 10, "epochs to anneal the temperature linearly to 1 (0 = keep it)", minimum=0),
    "path": Option(str, "auto", "execution path (all exact): " + "/".join(PATHS), choices=PATHS),
}


class ODAttentions(NamedTuple):
    """The four attentions of one forward; None where the head is absent (the attention is 1)."""

    channel: Tensor  # B x C_in, sigmoid
    filter: Optional[Tensor]  # B x C_out, sigmoid (None for depthwise convs)
    spatial: Optional[Tensor]  # B x kh*kw, sigmoid (None for 1x1 kernels)
    kernel: Optional[Tensor]  # B x n, softmax (None for n = 1)


def _kaiming_linear(layer: nn.Linear) -> nn.Linear:
    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class _Attention(nn.Module):
    """GAP -> FC(C_in -> A, no bias) -> BN -> ReLU -> heads (ODConv Sec. 3.2, Fig. 1b)."""

    def __init__(self, in_channels: int, out_channels: int, taps: int, num_kernels: int, hidden: int,
                 depthwise: bool) -> None:
        super().__init__()
        self.fc = _kaiming_linear(nn.Linear(in_channels, hidden, bias=False))
        self.bn: nn.Module = nn.BatchNorm1d(hidden)  # nn.Identity once folded (fold_inner_batchnorm)
        self.channel_fc = _kaiming_linear(nn.Linear(hidden, in_channels))
        self.filter_fc = None if depthwise else _kaiming_linear(nn.Linear(hidden, out_channels))
        self.spatial_fc = _kaiming_linear(nn.Linear(hidden, taps)) if taps > 1 else None
        self.kernel_fc = _kaiming_linear(nn.Linear(hidden, num_kernels)) if num_kernels > 1 else None

    def forward(self, x: Tensor, temperature: Tensor) -> ODAttentions:
        if self.training and x.shape[0] == 1 and isinstance(self.bn, nn.BatchNorm1d):
            raise ValueError(
                "ODConv2d: the attention's BatchNorm needs at least 2 samples per batch in training, got 1"
            )
        hidden = F.relu(self.bn(self.fc(x.mean(dim=(2, 3)))))
        t = temperature.to(hidden.dtype)

        def sigmoid_head(head: Optional[nn.Linear]) -> Optional[Tensor]:
            return None if head is None else torch.sigmoid(head(hidden) / t)

        channel = sigmoid_head(self.channel_fc)
        assert channel is not None
        kernel = None if self.kernel_fc is None else torch.softmax(self.kernel_fc(hidden) / t, dim=1)
        return ODAttentions(channel, sigmoid_head(self.filter_fc), sigmoid_head(self.spatial_fc), kernel)


@register_operator(
    "odconv", options=_OPTIONS,
    help="ODConv (Li et al. 2022): spatial, input-channel, output-channel and kernel attentions",
)
class ODConv2d(DynamicConv2d):
    """ODConv (ODConv paper Eq. 2): ``sum_i a_wi a_fi a_ci a_si W_i`` with a multi-head SE attention.

    Drop-in for :class:`torch.nn.Conv2d` (same constructor arguments and output shape) with the spec
    options of ``odconv`` as keywords (``k`` kernels, ``reduction``, ``temperature``, ``anneal_epochs``,
    ``path``). ``bias=True`` adds a static bias after the dynamic conv. See the module docstring.
    """

    temperature: Tensor  # buffer: the softmax temperature of the kernel attention, annealed per epoch

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
        k: int = 1,
        reduction: float = 0.0625,
        temperature: float = 30.0,
        anneal_epochs: int = 10,
        path: str = "auto",
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.check_options(k=k, reduction=reduction, temperature=temperature, anneal_epochs=anneal_epochs, path=path)
        self.num_kernels = k
        self.reduction = float(reduction)
        self.path = path
        self.hidden = max(int(in_channels * self.reduction), MIN_ATTENTION_CHANNELS)
        kh, kw = self.kernel_size
        self.depthwise = in_channels == groups == out_channels
        self.weight = nn.Parameter(torch.empty(k, out_channels, in_channels // groups, kh, kw))
        for i in range(k):
            nn.init.kaiming_normal_(self.weight.data[i], mode="fan_out", nonlinearity="relu")
        if bias:
            self.bias: Optional[nn.Parameter] = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_parameter("bias", None)
        self.attention = _Attention(in_channels, out_channels, kh * kw, k, self.hidden, self.depthwise)
        self.initial_temperature = float(temperature)
        self.anneal_epochs = anneal_epochs
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    # ------------------------------------------------------------------------------------ hooks
    @staticmethod
    def schedule(epoch: int, initial: float = 30.0, anneal_epochs: int = 10) -> float:
        """Temperature at the start of ``epoch`` (0-based): linear from ``initial`` to 1 over ``anneal_epochs``."""
        if anneal_epochs <= 0:
            return float(initial)
        frac = min(max(epoch, 0), anneal_epochs) / anneal_epochs
        return float(initial + (1.0 - initial) * frac)

    def set_epoch(self, epoch: int) -> None:
        self.temperature.fill_(self.schedule(epoch, self.initial_temperature, self.anneal_epochs))

    @torch.no_grad()
    def load_static_weight(self, weight: Tensor, bias: Optional[Tensor] = None) -> None:
        """Copy a static conv's weight into every kernel (the softmax over kernels sums to 1) and its bias."""
        if tuple(weight.shape) != tuple(self.weight.shape[1:]):
            raise ValueError(
                f"ODConv2d.load_static_weight: weight shape {tuple(weight.shape)} != {tuple(self.weight.shape[1:])}"
            )
        self.weight.copy_(weight.unsqueeze(0).expand_as(self.weight))
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, k={self.num_kernels}, hidden={self.hidden}, "
                f"temperature={float(self.temperature):g}, path={self.path}")

    # ------------------------------------------------------------------------------- attentions
    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ODConv2d: expected input B x {self.in_channels} x H x W, got {tuple(x.shape)}")

    def attentions(self, x: Tensor) -> ODAttentions:
        """``a_c`` (B x C_in), ``a_f`` (B x C_out), ``a_s`` (B x k*k), ``a_w`` (B x n); None where absent."""
        self._check_input(x)
        return self.attention(x, self.temperature)

    def kernel_weight(self, att: ODAttentions, batch: int) -> Tensor:
        """Per-sample ``K(x) = a_s (.) sum_i a_wi W_i`` (B x C_out x C_in/g x kh x kw)."""
        if att.kernel is None:
            w = self.weight[0].unsqueeze(0)
        else:
            w = (att.kernel @ self.weight.reshape(self.num_kernels, -1)).view(batch, *self.weight.shape[1:])
        if att.spatial is not None:
            w = w * att.spatial.view(-1, 1, 1, *self.kernel_size)
        return w.expand(batch, *self.weight.shape[1:])

    def _channel_map(self, channel: Tensor) -> Tensor:
        """``a_c`` laid out on the weight: B x C_out x C_in/g (input channel c of group g for group g's filters)."""
        batch = channel.shape[0]
        g, cin_g, cout_g = self.groups, self.in_channels // self.groups, self.out_channels // self.groups
        return channel.view(batch, g, 1, cin_g).expand(batch, g, cout_g, cin_g).reshape(batch, self.out_channels, cin_g)

    def dynamic_weight(self, x: Tensor) -> Tensor:
        """Per-sample effective weight of Eq. 2 (B x C_out x C_in/g x kh x kw), for inspection and tests."""
        att = self.attentions(x)
        return self._effective_weight(att, x.shape[0])

    def _effective_weight(self, att: ODAttentions, batch: int) -> Tensor:
        w = self.kernel_weight(att, batch) * self._channel_map(att.channel)[..., None, None]
        if att.filter is not None:
            w = w * att.filter.view(batch, -1, 1, 1, 1)
        return w

    # -------------------------------------------------------------------------------- execution
    def _choose_path(self, x: Tensor, att: ODAttentions) -> str:
        if self.path != "auto":
            return self.path
        if att.spatial is None and att.kernel is None:
            return "factored"  # 1x1, n = 1: the dense conv
        batch = x.shape[0]
        if batch == 1 or self.in_channels // self.groups == 1:
            return "materialize"
        kh, kw = self.kernel_size
        ho, wo = self.output_size(x.shape[2], x.shape[3])
        return "materialize" if self.out_channels * kh * kw <= GROUPED_MAX_WEIGHT_RATIO * ho * wo else "unfold"

    def forward(self, x: Tensor) -> Tensor:
        att = self.attentions(x)
        path = self._choose_path(x, att)
        batch = x.shape[0]
        if path == "reference":
            weights = self._effective_weight(att, batch)
            out = torch.cat([F.conv2d(x[b : b + 1], weights[b], None, groups=self.groups, **self.conv_kwargs())
                             for b in range(batch)])
        else:
            u = x * att.channel.view(batch, self.in_channels, 1, 1)
            out = self._kernel_conv(u, att, path)
            if att.filter is not None:
                out = out * att.filter.view(batch, self.out_channels, 1, 1)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def _kernel_conv(self, u: Tensor, att: ODAttentions, path: str) -> Tensor:
        """``conv(u_b, K_b)`` per sample, ``K_b = a_s,b (.) sum_i a_w,bi W_i``, by ``path``."""
        kwargs = self.conv_kwargs()
        batch = u.shape[0]
        if att.spatial is None and att.kernel is None:
            return F.conv2d(u, self.weight[0], None, groups=self.groups, **kwargs)
        if path == "materialize":
            return per_sample_conv2d(u, self.kernel_weight(att, batch), None, groups=self.groups, method="grouped",
                                     **kwargs)
        if path == "unfold":
            if att.kernel is not None:
                return per_sample_conv2d(u, self.kernel_weight(att, batch), None, groups=self.groups,
                                         method="unfold", **kwargs)
            return self._unfold_shared(u, att.spatial)
        if path != "factored":
            raise ValueError(f"ODConv2d: path must be one of {', '.join(PATHS)}, got {path!r}")
        return self._factored(u, att)

    def _unfold_shared(self, u: Tensor, spatial: Optional[Tensor]) -> Tensor:
        """``n = 1``: patches scaled by ``a_s`` per tap, one matmul with the shared W (no per-sample weight)."""
        batch = u.shape[0]
        kh, kw = self.kernel_size
        g, cin_g, cout_g = self.groups, self.in_channels // self.groups, self.out_channels // self.groups
        ho, wo = self.output_size(u.shape[2], u.shape[3])
        patches = F.unfold(u, self.kernel_size, self.dilation, self.padding, self.stride)
        patches = patches.view(batch, g, cin_g, kh * kw, ho * wo)
        if spatial is not None:
            patches = patches * spatial.view(batch, 1, 1, kh * kw, 1)
        weight = self.weight[0].reshape(g, cout_g, cin_g * kh * kw)
        y = torch.matmul(weight, patches.view(batch, g, cin_g * kh * kw, ho * wo))
        return y.view(batch, self.out_channels, ho, wo)

    def _factored(self, u: Tensor, att: ODAttentions) -> Tensor:
        """``sum_i sum_t a_wi a_s[t] conv1x1(shift_t(u), W_i[:, :, t])``: dense convs, no per-sample weight."""
        batch = u.shape[0]
        kh, kw = self.kernel_size
        ho, wo = self.output_size(u.shape[2], u.shape[3])
        (ph, pw), (sh, sw), (dh, dw) = self.padding, self.stride, self.dilation
        padded = F.pad(u, (pw, pw, ph, ph)) if ph or pw else u
        out: Optional[Tensor] = None
        for i in range(self.num_kernels):
            for ti in range(kh):
                for tj in range(kw):
                    window = padded[:, :, ti * dh : ti * dh + sh * (ho - 1) + 1 : sh,
                                    tj * dw : tj * dw + sw * (wo - 1) + 1 : sw]
                    y = F.conv2d(window, self.weight[i, :, :, ti : ti + 1, tj : tj + 1], None, groups=self.groups)
                    coef: Optional[Tensor] = None
                    if att.spatial is not None:
                        coef = att.spatial[:, ti * kw + tj]
                    if att.kernel is not None:
                        coef = att.kernel[:, i] if coef is None else coef * att.kernel[:, i]
                    if coef is not None:
                        y = y * coef.view(batch, 1, 1, 1)
                    out = y if out is None else out + y
        assert out is not None
        return out

    # ---------------------------------------------------------------------------------- counting
    def macs(self, input_shape: Tuple[int, ...]) -> int:
        """Multiply-adds for one input of ``input_shape`` (B x C x H x W), in PEDConv's convention.

        The static conv of this geometry, the attention branch (its FC and heads), and the synthesis of
        the effective weight as :mod:`image_classification.measurement.macs` counts it for PEDConv: ``2 C_out C_in/g
        k^2`` for the rank-1 attention tensor ``a_f (x) a_c (x) a_s`` and its product with the kernel,
        plus ``n C_out C_in/g k^2`` for the kernel mixture when ``n > 1``. Activation scalings, BatchNorm
        and activations are not counted (as in the papers). ODConv's own MAdds (a counter it does not
        name) are higher; docs/counts.md lists both.
        """
        batch, _, height, width = input_shape
        ho, wo = self.output_size(height, width)
        kh, kw = self.kernel_size
        weight = self.out_channels * (self.in_channels // self.groups) * kh * kw
        heads = self.in_channels + (0 if self.depthwise else self.out_channels) + (kh * kw if kh * kw > 1 else 0)
        heads += self.num_kernels if self.num_kernels > 1 else 0
        attention = self.in_channels * self.hidden + self.hidden * heads
        synthesis = 2 * weight + (self.num_kernels * weight if self.num_kernels > 1 else 0)
        return int(batch) * (ho * wo * weight + attention + synthesis)

    # ------------------------------------------------------------------------------- deployment
    def export_route(self) -> ExportRoute:
        """Export: :meth:`prepare_export` picks the path (ValueError refuses)."""
        try:
            self.prepare_export()
        except ValueError as exc:
            return ExportRoute(refuse=str(exc))
        return ExportRoute(label=str(self.path))

    def prepare_export(self) -> None:
        """Choose a path whose ops keep the batch a plain axis (dynamic-batch export): ``factored`` for
        ``n = 1`` (dense convs and channel scalings), ``unfold`` for ``n > 1`` (one batched matmul)."""
        self.path = "factored" if self.num_kernels == 1 else "unfold"

    @torch.no_grad()
    def fold_output_affine(self, scale: Tensor, shift: Tensor) -> None:
        """Fold a following per-output-channel affine map ``scale * y + shift`` (an eval-mode BatchNorm).

        Exact: ``a_f`` and ``scale`` both act per output channel, so ``scale * (a_f * conv(a_c x, K)) =
        a_f * conv(a_c x, K')`` with every kernel's filters ``W_i[o] *= scale[o]`` (K is linear in the W_i),
        and the shift becomes the static bias (``bias' = scale * bias + shift``).
        """
        if scale.shape != (self.out_channels,) or shift.shape != (self.out_channels,):
            raise ValueError(f"ODConv2d.fold_output_affine: scale/shift must have {self.out_channels} entries")
        self.weight.mul_(scale.to(self.weight).view(1, -1, 1, 1, 1))
        shift = shift.to(self.weight)
        new_bias = shift if self.bias is None else self.bias * scale.to(self.weight) + shift
        self.bias = nn.Parameter(new_bias.clone())

    @torch.no_grad()
    def fold_inner_batchnorm(self) -> int:
        """Fold the attention's BatchNorm (eval statistics) into its bias-free FC; returns 1 (0 if done before)."""
        bn = self.attention.bn
        if not isinstance(bn, nn.BatchNorm1d):
            return 0
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("ODConv2d: the attention BatchNorm tracks no running statistics and cannot be folded")
        fc = self.attention.fc
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * scale
        folded = nn.Linear(fc.in_features, fc.out_features, bias=True).to(fc.weight)
        folded.weight.copy_(fc.weight * scale[:, None])
        folded.bias.copy_(shift if fc.bias is None else fc.bias * scale + shift)
        self.attention.fc = folded
        self.attention.bn = nn.Identity()
        return 1
