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

The generator is fused at run time: the heads of a conv (and of every conv sharing a generator) run
as ONE ``F.linear`` over their concatenated weights, the noise and the sigmoid act on that one
output, and the sampled pre-sigmoid vector is, as it is, the info-max decoder's input. The parameters
keep their per-head modules and names (``generator.heads.<i>.fc_{phi,gamma,psi}[_logvar]``), so
checkpoints and the authors' layout load unchanged.

Execution paths (``path`` option; every path equals ``reference`` to float rounding) are the entries
of :data:`.paths.PATH_REGISTRY`: ``reference``, ``materialize``, ``fold``, ``patch_gemm``
(single-GEMM patches), ``factored`` and ``unfold`` (see :mod:`.paths`; the fast ones are lean
custom autograd Functions, :mod:`.kernels`). ``auto`` (default) times the applicable paths on
the first use of every (layer geometry, input shape, dtype, device, backward-or-not) and keeps the
fastest (:mod:`.selection`, :mod:`..autotune`); with tuning off it uses :func:`.paths.heuristic_path`. The
choice is made in Python before any tensor work and, under ``torch.compile``, at trace time as a
constant (no guard, no recompilation when other shapes are tuned later). :func:`.report.path_report` lists
the path every layer used for every input shape it has seen.

Parameter names (for profilers and checkpoints): ``weight`` (W_base), ``bias`` (static bias added after
the conv, optional), ``generator.*`` (deploy-time generator: ``generator.proj`` for bilinear context,
``generator.fc_share``, ``generator.heads.<i>.fc_{phi,gamma,psi}[_logvar]``) and ``infomax_decoder.*``
(training only: a profiler counting deploy parameters excludes names containing ``infomax_decoder``;
:meth:`PEDConv2d.remove_infomax_decoder` drops it, ``infomax=False`` never builds it).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...compat import addmm_relu, any_autocast_enabled
from .. import autotune
from ..protocol import ExportRoute
from ..registry import LiveChoices, Option, register_operator
from .authors import AUTHORS_LAYOUT
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
from .counts import pedconv_weight_sums
from .export_forms import SELECTOR_BUFFERS, applicable_forms, tap_selector
from .kernels import batch1_plan, gemm_batch1, weight_folded_conv
from .paths import (
    GROUPED_MAX_WEIGHT_RATIO,
    PATH_REGISTRY,
    Factors,
    effective_weight,
    path_names,
)
from .selection import forget_paths, logged_paths, register_layer, resolve_path, tuning_key

__all__ = ["COMPONENTS", "GROUPED_MAX_WEIGHT_RATIO", "MIN_HIDDEN", "PATHS", "PEDConv2d", "share_generator"]

#: ``auto`` and every registered execution path (:data:`.paths.PATH_REGISTRY`), read at each use: a path
#: registered after this import is a valid ``path=NAME``.
PATHS: LiveChoices = LiveChoices(path_names)

_OPTIONS = {
    **CP_OPTIONS,
    "context": Option(str, "gap", "generator context pooling (Appendix Table 2)", choices=("gap", "bilinear")),
    "reparam": Option(
        str, "multiplicative", "W_base * CP (Eq. 2) or W_base + CP (Appendix E)",
        choices=("multiplicative", "additive"),
    ),
    **SAMPLING_OPTIONS,
    "path": Option(str, "auto", "execution path (all exact; auto = autotuned): auto or a registered path",
                   choices=PATHS),
}

Components = Dict[str, Optional[Tensor]]

#: paths that are one dense convolution with the whole CP tensor in the weight at batch 1
_WEIGHT_FOLDED_PATHS = frozenset({"fold", "materialize", "sample_loop"})


class _Heads(nn.Module):
    """The component heads of one dynamic conv: Linear(hidden -> R * dim) per present component.

    The Linears hold the parameters (and their state-dict names); :class:`_Generator` runs all heads
    of all its convs as one fused ``F.linear`` (:meth:`linears` gives them in the fused order).
    """

    def __init__(self, hidden: int, dims: Mapping[str, int], rank: int, learned: bool, noise_std: float) -> None:
        super().__init__()
        self.rank = rank
        self.dims = {name: dims[name] for name in COMPONENTS if name in dims}
        self.learned = learned
        logvar_bias = logvar_init_bias(noise_std)
        for name, dim in self.dims.items():
            head = nn.Linear(hidden, rank * dim)
            normal_init(head)
            self.add_module(f"fc_{name}", head)
            if learned:
                # starts at the fixed-noise std, so 'learned' begins where 'fixed' stays
                logvar = nn.Linear(hidden, rank * dim)
                normal_init(logvar, logvar_bias)
                self.add_module(f"fc_{name}_logvar", logvar)

    @property
    def total_dim(self) -> int:
        return self.rank * sum(self.dims.values())

    def linears(self, logvar: bool = False) -> Tuple[nn.Linear, ...]:
        """The mean (or log-variance) heads in the decoder's component order (phi, gamma, psi)."""
        suffix = "_logvar" if logvar else ""
        return tuple(getattr(self, f"fc_{name}{suffix}") for name in self.dims)

    def forward(self, hidden: Tensor) -> Dict[str, Tuple[Tensor, Optional[Tensor]]]:
        """Per-component (mean, log-variance) pre-sigmoid outputs, unfused (for inspection)."""
        out: Dict[str, Tuple[Tensor, Optional[Tensor]]] = {}
        for name in self.dims:
            mean = getattr(self, f"fc_{name}")(hidden)
            logvar = getattr(self, f"fc_{name}_logvar")(hidden) if self.learned else None
            out[name] = (mean, logvar)
        return out


class _Generator(nn.Module):
    """Context pooling -> Linear(C -> hidden) -> ReLU -> fused heads (Eq. 7); ``heads[i]`` serves conv i."""

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
        normal_init(self.fc_share)
        self.heads = nn.ModuleList()
        # inference-only caches: logvar flag -> (stamp, weight, bias, params) of the concatenated heads, and
        # "inference" -> (stamp, inference_weights(), params)
        self._fused_cache: Dict[Any, Tuple[Any, ...]] = {}

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_fused_cache"] = {}
        return state

    def pool(self, x: Tensor) -> Tensor:
        """The context vector: GAP (B x C_in) or bilinear pooling (B x d*d)."""
        if self.context == "gap":
            return x.mean(dim=(2, 3))
        z = F.conv2d(x, self.proj.weight[:, :, None, None]).flatten(2)  # B x d x HW
        second = torch.bmm(z, z.transpose(1, 2)) / z.shape[-1]  # B x d x d (bilinear pooling, Lin et al.)
        second = torch.sign(second) * torch.sqrt(second.abs() + 1e-6)  # signed square root
        return F.normalize(second.flatten(1), dim=1)  # l2 normalization

    def head_sets(self) -> Sequence[_Heads]:
        """Each served conv's :class:`_Heads`, in the fused order (``heads`` with its element type)."""
        return cast("Sequence[_Heads]", self.heads)

    @property
    def total_dim(self) -> int:
        """Length of the fused head output: every conv's components, conv-major, phi/gamma/psi order."""
        return sum(heads.total_dim for heads in self.head_sets())

    def _head_params(self, logvar: bool) -> List[Tensor]:
        """The (mean or log-variance) heads' weights and biases, interleaved, in the fused order; read
        through the modules' parameter dicts (this runs on every inference forward)."""
        suffix = "_logvar" if logvar else ""
        out: List[Tensor] = []
        for heads in cast("Iterable[_Heads]", self.heads._modules.values()):
            modules = heads._modules
            for name in heads.dims:
                # the heads are Linears with a bias: both entries are set
                params = cast("Dict[str, Tensor]", cast(nn.Linear, modules[f"fc_{name}{suffix}"])._parameters)
                out.append(params["weight"])
                out.append(params["bias"])
        return out

    @staticmethod
    def _stamp(params: Sequence[Tensor]) -> Optional[Tuple[Tuple[int, int, int], ...]]:
        """What an inference cache of ``params`` is valid for: identity (a replaced parameter), version (an
        in-place update) and data pointer (``.to()``/``.half()`` swap ``.data`` and keep both); None for
        parameters made under inference mode, which track no version (no cache)."""
        try:
            return tuple([(id(p), p._version, p.data_ptr()) for p in params])
        except RuntimeError:
            return None

    @staticmethod
    def _concat(params: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        """(weights concatenated, biases concatenated) of interleaved ``[w0, b0, w1, b1, ...]``."""
        weights, biases = params[0::2], params[1::2]
        if len(weights) == 1:
            return weights[0], biases[0]
        return torch.cat(list(weights)), torch.cat(list(biases))

    def _fused(self, logvar: bool) -> Tuple[Tensor, Tensor]:
        """All heads' (mean or log-variance) weights and biases concatenated in the fused order.

        Outside autograd (inference, eager) the concatenation is cached until a parameter changes
        (:meth:`_stamp`).
        """
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
            linears = [lin for heads in self.head_sets() for lin in heads.linears(logvar)]
            if len(linears) == 1:
                return linears[0].weight, linears[0].bias
            return torch.cat([lin.weight for lin in linears]), torch.cat([lin.bias for lin in linears])
        params = self._head_params(logvar)
        stamp = self._stamp(params)
        cached = self._fused_cache.get(logvar)
        if stamp is not None and cached is not None and cached[0] == stamp:
            return cached[1], cached[2]
        weight, bias = self._concat(params)
        if stamp is not None:  # holding the parameters keeps their ids unique while the entry lives
            self._fused_cache[logvar] = (stamp, weight, bias, params)
        return weight, bias

    def inference_weights(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(``fc_share`` weight transposed, its bias, the fused mean heads' weight transposed, their bias) for
        ``torch.addmm`` in eager inference, cached until a parameter changes (:meth:`_stamp`)."""
        share = cast("Dict[str, Tensor]", self.fc_share._parameters)  # Linear with a bias: both set
        params = [share["weight"], share["bias"], *self._head_params(False)]
        stamp = self._stamp(params)
        cached = self._fused_cache.get("inference")
        if stamp is not None and cached is not None and cached[0] == stamp:
            return cached[1]
        weight, bias = self._concat(params[2:])
        value = (params[0].t(), params[1], weight.t(), bias)
        if stamp is not None:  # holding the parameters keeps their ids unique while the entry lives
            self._fused_cache["inference"] = (stamp, value, params)
        return value

    def forward(self, x: Tensor, noise_std: Optional[float] = None) -> Tuple[Tensor, Tensor]:
        """(context, sampled pre-sigmoid components B x total_dim) for input ``x``.

        ``noise_std`` None: no noise (the mean, evaluation); a float: Eq. 5 noise with that std, or with
        the learned log-variance heads when they exist.
        """
        context = x.mean(dim=(2, 3)) if self.context == "gap" else self.pool(x)
        share = self.fc_share
        hidden = F.relu(F.linear(context, share.weight, share.bias))
        weight, bias = self._fused(False)
        learned = noise_std is not None and self.head_sets()[0].learned
        if learned:
            lv_weight, lv_bias = self._fused(True)
            mean, logvar = F.linear(hidden, torch.cat([weight, lv_weight]), torch.cat([bias, lv_bias])).chunk(2, dim=1)
            return context, torch.addcmul(mean, torch.exp(0.5 * logvar), torch.randn_like(mean))
        mean = F.linear(hidden, weight, bias)
        if noise_std is None or noise_std == 0:
            return context, mean
        return context, torch.add(mean, torch.randn_like(mean), alpha=noise_std)

    def macs(self, input_shape: Sequence[int]) -> int:
        """Multiply-adds of an evaluation forward (``fc_share`` and the mean heads; pooling not counted)."""
        batch = int(input_shape[0])
        hidden = self.fc_share.out_features
        return batch * (self.context_dim * hidden + hidden * self.total_dim)


@register_operator("pedconv", options=_OPTIONS, help="PEDConv: CP-decomposed dynamic convolution (Hou & Kung 2021)")
class PEDConv2d(BaseWeightInfomaxConv2d):
    """PEDConv (Eq. 1-7): ``W(x) = W_base * sum_r gamma_r (x) phi_r (x) psi_r`` with a sampled generator.

    Drop-in for :class:`torch.nn.Conv2d` (same constructor arguments and output shape) with the spec
    options of ``pedconv`` as keywords. ``bias=True`` adds a static bias after the dynamic conv.
    """

    #: the authors' release initialises every BatchNorm gamma to 0.5 (build_model's bn_gamma="auto")
    default_bn_gamma = 0.5
    #: placement '+share': one generator per residual block (Appendix D, Table 2)
    shares_generator = True
    #: the authors' release loads through its converter (:mod:`.authors`)
    foreign_layouts = (AUTHORS_LAYOUT,)

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
        self.check_options(rank=rank, reduction=reduction, components=components, context=context, reparam=reparam,
                           sampling=sampling, noise_std=noise_std, infomax=infomax, path=path)
        check_rank(rank, out_channels, in_channels // groups, self.kernel_size[0] * self.kernel_size[1])
        self.rank = rank
        self.reduction = reduction
        self.components = ordered_components("PEDConv2d", components)
        self.context = context
        self.reparam = reparam
        self.sampling = sampling
        self.noise_std = float(noise_std)
        self.path = path
        self.hidden = max(in_channels // reduction, MIN_HIDDEN)

        self._make_base_weight(bias)
        self.generator: Optional[_Generator] = _Generator(in_channels, self.hidden, context)
        self.generator.heads.append(self._make_heads(self.hidden))
        self.infomax_decoder: Optional[nn.Sequential] = None
        if infomax:
            self.infomax_decoder = self._make_decoder(self.generator.head_sets()[0].total_dim)
        self._infomax: Optional[Tensor] = None
        self._followers: List[PEDConv2d] = []  # plain list: not registered as submodules
        self._is_follower = False
        self._shared_cache: Optional[Factors] = None
        self._register()

    def _register(self) -> None:
        """A fresh token for the autotuner's layer look-up and the path log (kept by :mod:`.selection`)."""
        self._token = register_layer(self)
        self._path_memo: Dict[Any, Tuple[Any, str]] = {}  # eager look-ups, see _select_path

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._register()  # a copy (deepcopy, EMA, unpickling) is a layer of its own

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
        first, last = nn.Linear(in_dim, self.hidden), nn.Linear(self.hidden, self.generator.context_dim)
        normal_init(first)
        normal_init(last)
        return nn.Sequential(first, nn.ReLU(inplace=True), last)

    @classmethod
    def share_generators(cls, convs: Sequence[nn.Module]) -> None:
        """Placement ``+share``: :func:`share_generator` (Appendix D, Table 2)."""
        share_generator(convs)  # type: ignore[arg-type]  # the +share placement passes PEDConv2d layers only

    def weight_moments(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Weight-variation moments from the factors: :func:`.counts.pedconv_weight_sums`."""
        return pedconv_weight_sums(self, x)

    def export_route(self) -> ExportRoute:
        """Export: the ``factored`` path (the batch stays a plain axis) until :meth:`set_export_form` chooses the
        layer's form for its input size (:mod:`.export_forms`); the additive form is refused."""
        if self.reparam != "multiplicative":
            return ExportRoute(refuse="additive reparameterization: its low-rank term runs a grouped conv with "
                                      "groups = batch (no dynamic-batch path)")
        return ExportRoute(path="factored", label="factored")

    def set_export_form(self, form: str) -> None:
        """Run export form ``form`` (:data:`.export_forms.EXPORT_FORMS`), holding its 0/1 selector convolution
        weight as a non-persistent buffer so the exported graph has it as a constant initializer (never in a
        state dict). ValueError for a form that does not apply to this layer."""
        forms = applicable_forms(self)
        if form not in forms:
            raise ValueError(f"pedconv: export form {form!r} does not apply to this layer (valid: {', '.join(forms)})")
        for tap_major, name in SELECTOR_BUFFERS.items():
            wanted = (form in ("expand", "cols") and not tap_major) or (form == "shift" and tap_major)
            self._buffers.pop(name, None)
            if wanted:
                selector = tap_selector(self.in_channels, self.groups, self.kernel_size, tap_major, self.weight)
                self.register_buffer(name, selector.contiguous(), persistent=False)
        self.path = form

    def macs(self, input_shape: Sequence[int]) -> int:
        """``B (H_out W_out C_out C_in/g k^2 + generator + 2 R C_out C_in/g k^2)`` (PEDConv, BMVC 2021,
        Sec. 3, complexity analysis): the convolution with the per-sample weight, the generator
        (``fc_share`` and the mean heads of every conv it serves, :meth:`_Generator.macs`; none for a conv
        that uses a shared generator) and the rank-R scaling of the weight (this reproduces the paper's
        rank 4/8 rows, Table 5b). Pooling, the sigmoid and the training-only decoder are not counted."""
        generator = self.generator.macs(input_shape) if self.generator is not None else 0
        scaling = int(input_shape[0]) * 2 * self.rank * self.weight.numel()
        return self.static_macs(tuple(input_shape)) + generator + scaling

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

    def _sample(self, x: Tensor, record: bool) -> Factors:
        """Post-sigmoid components (None for left-out ones), each B x R x dim.

        Training with ``sampling != 'none'`` draws the Eq. 5 noise on the pre-sigmoid values. With
        ``record`` the info-max term is stored and followers of a shared generator get their components.
        """
        if self._is_follower:
            cached = self._shared_cache
            if cached is None:
                raise RuntimeError("PEDConv2d shares the generator of an earlier conv: run that conv first")
            if record:
                self._shared_cache = None
            return cached
        assert self.generator is not None
        noisy = self.training and self.sampling != "none"
        context, pre = self.generator(x, self.noise_std if noisy else None)
        if record:
            if self.training and self.infomax_decoder is not None:
                # the fused output is already the decoder's input: conv-major, (phi, gamma, psi) order
                self._infomax = F.mse_loss(self.infomax_decoder(pre), context.detach())
            else:
                self._infomax = None
        post = torch.sigmoid(pre)
        batch = x.shape[0]
        convs, widths, slots = self._factor_layout()
        parts = post.split(widths, dim=1) if len(widths) > 1 else (post,)
        result: Optional[Factors] = None
        for i, conv in enumerate(convs):
            comps: List[Optional[Tensor]] = [None, None, None]  # gamma, phi, psi
            for part, (conv_index, slot, rank, dim) in zip(parts, slots):
                if conv_index == i:
                    comps[slot] = part.view(batch, rank, dim)
            factors = Factors(comps[0], comps[1], comps[2])
            if result is None:
                result = factors
            elif record:
                conv._shared_cache = factors
        assert result is not None
        return result

    def _factor_layout(self) -> Tuple[List[PEDConv2d], List[int], List[Tuple[int, int, int, int]]]:
        """(convs: this one then its followers, widths of the fused output's pieces, and per piece
        (conv index, slot 0/1/2 for gamma/phi/psi, rank, dim)); memoised per number of followers."""
        assert self.generator is not None
        memo = self.__dict__.get("_layout_memo")
        if memo is not None and memo[0] == len(self._followers) and not torch.compiler.is_compiling():
            return memo[1]
        convs = [self, *self._followers]
        widths: List[int] = []
        slots: List[Tuple[int, int, int, int]] = []
        for i, heads in enumerate(self.generator.head_sets()):
            for name, dim in heads.dims.items():
                widths.append(heads.rank * dim)
                slots.append((i, ("gamma", "phi", "psi").index(name), heads.rank, dim))
        layout = (convs, widths, slots)
        if not torch.compiler.is_compiling():
            self.__dict__["_layout_memo"] = (len(self._followers), layout)
        return layout

    def factors(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(gamma, phi, psi), each B x R x dim: the post-sigmoid values a forward on ``x`` would use.

        Left-out components are ones. In training with sampling this draws fresh noise (so two calls
        differ); in eval it is the deterministic mean. It does not touch the info-max term. A conv that
        shares an earlier conv's generator returns the components cached by that conv's last forward.
        """
        self._check_input(x)
        return self._sample(x, record=False).full(self, x)

    def dynamic_weight(self, x: Tensor) -> Tensor:
        """Per-sample effective weight B x C_out x C_in/g x kh x kw (Eq. 2 / Appendix E), for inspection."""
        return effective_weight(self, self.weight, *self.factors(x))

    # -------------------------------------------------------------------------------------- execution
    def _select_path(self, x: Tensor) -> str:
        """The path of this forward: ``self.path``, or for ``auto`` the tuned/cached/heuristic choice.

        Eager calls memoise the choice per (input shape, dtype, layout, autocast, backward) against the
        autotuner's generation counter; under torch.compile the choice is a trace-time constant.
        """
        if torch.compiler.is_compiling() and self.path != "auto":
            # a fixed path needs no key: reading the shape as Python ints would specialise (guard) the batch
            # size of an exported or dynamic-shape graph
            return self.path
        grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if torch.compiler.is_compiling():
            return resolve_path(self._token, self.path, tuning_key(self, x, grad))
        memo_key = (x.shape, x.dtype, x.device, x.stride(), grad, torch.is_autocast_enabled(x.device.type), self.path)
        hit = self._path_memo.get(memo_key)
        stamp = (autotune.generation(), autotune.autotune_enabled())
        if hit is not None and hit[0] == stamp:
            return hit[1]
        path = resolve_path(self._token, self.path, tuning_key(self, x, grad))
        self._path_memo[memo_key] = (stamp, path)
        return path

    def logged_paths(self) -> Dict[Tuple[Tuple[int, ...], bool], Dict[str, Any]]:
        """(input shape, backward follows) -> {"path", "source", "times_ms"} of the forwards seen so far
        (:func:`.selection.resolve_path` records them)."""
        return logged_paths(self._token)

    def forget_paths(self) -> None:
        """Forget the logged paths and the memoised choices (the autotuner's cache stays)."""
        forget_paths(self._token)
        self._path_memo.clear()

    def _lean_inference(self, x: Tensor) -> Optional[Tensor]:
        """Batch-1 eager inference in the fewest dispatches the math needs, or None where it does not apply.

        GAP as a sum and ``fc_share`` + ReLU in one call (the 1/HW rides on the matrix product), the fused
        heads + sigmoid (in place), three strided views of the fused output as gamma/phi/psi laid out to
        broadcast where they act, and :func:`.kernels.weight_folded_conv`: 10 aten calls on top of
        the static convolution, the activations read once by the pooling and once by the convolution.
        This is the ``fold``/``materialize``/``sample_loop`` computation at batch 1 (they coincide there:
        one dense conv with the folded weight), taken when the chosen path is one of them; for
        ``patch_gemm`` and ``unfold`` (groups 1; at batch 1 both are one product of the weight and the
        scaled patches) the same factors go to :func:`.kernels.gemm_batch1` (2 views more, and
        the patch matrix for k x k kernels). Eval mode, rank 1, multiplicative, GAP context, no shared
        generator, no autocast, not compiled or traced.
        """
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return None  # checked first: the memo below is a module-dict write, which torch 2.6's dynamo cannot trace
        lean = self.__dict__.get("_lean")
        if lean is None:
            lean = self.__dict__["_lean"] = {} if self._lean_applies() else False
        if (not isinstance(lean, dict) or self.training or any_autocast_enabled() or x.dim() != 4 or x.shape[0] != 1
                or x.shape[1] != self.in_channels):
            return None
        # one memo for the path choice and the plan, checked against the autotuner's state as _select_path's
        key = (x.shape, x.stride(), x.dtype, x.device)
        stamp = (autotune.generation(), autotune.autotune_enabled(), self.path)
        hit = lean.get(key)
        if hit is None or hit[0] != stamp:
            hit = lean[key] = (stamp, self._lean_plan(self._select_path(x), x.shape[2], x.shape[3]))
        plan = hit[1]
        if not plan:
            return None
        kernel, specs, geometry = plan
        assert self.generator is not None  # _lean_applies: a leader with its own generator
        share_weight_t, share_bias, heads_weight_t, heads_bias = self.generator.inference_weights()
        # GAP as a sum whose 1/HW rides on the matrix product (alpha): one pass, no division
        hidden = addmm_relu(share_bias, x.sum((2, 3)), share_weight_t, 1.0 / (x.shape[2] * x.shape[3]))
        post = torch.addmm(heads_bias, hidden, heads_weight_t).sigmoid_()
        if self._infomax is not None:
            self._infomax = None
        gamma, phi, psi = (None if spec is None else post.as_strided(*spec) for spec in specs)
        return kernel(x, self.weight, gamma, phi, psi, geometry, self.bias)

    def _lean_applies(self) -> bool:
        return (self.rank == 1 and self.reparam == "multiplicative" and self.context == "gap"
                and not self._is_follower and not self._followers and self.generator is not None
                and len(self.generator.heads) == 1)

    def _lean_plan(self, path: str, height: int, width: int) -> Tuple[Any, ...]:
        """(kernel, (size, stride, offset) of the gamma/phi/psi views of the fused generator output, geometry)
        for :meth:`_lean_inference` at this path and input size; () where it does not apply."""
        if path in _WEIGHT_FOLDED_PATHS:
            engine, kernel = "conv", weight_folded_conv
        elif path in ("patch_gemm", "unfold") and self.groups == 1:  # at batch 1 both are W @ scaled patches
            engine, kernel = "gemm", gemm_batch1
        else:
            return ()
        kh, kw = self.kernel_size
        cout, cin_g = self.out_channels, self.in_channels // self.groups
        assert self.generator is not None  # _lean_applies: a leader with its own generator
        dims = self.generator.head_sets()[0].dims
        on_weight, on_patches = batch1_plan(engine, self.weight.shape, self.output_size(height, width),
                                            "phi" in dims or "psi" in dims)
        shapes = {"gamma": ((cout, 1, 1, 1), (1, 0, 0, 0)) if on_weight else ((cout, 1, 1), (1, 0, 0)),
                  "phi": ((cin_g, 1, 1), (1, 0, 0)),
                  "psi": ((kh * kw, 1), (1, 0)) if on_patches else ((kh, kw), (kw, 1))}
        specs: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...], int]] = {}
        offset = 0
        for name, dim in dims.items():  # the fused order (phi, gamma, psi)
            specs[name] = (*shapes[name], offset)
            offset += dim
        return kernel, tuple(specs.get(name) for name in ("gamma", "phi", "psi")), self.geometry

    @property
    def geometry(self) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int], int]:
        """(stride, padding, dilation, groups) as the kernels take them."""
        return (self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            out = self._lean_inference(x)
            if out is not None:
                return out
        self._check_input(x)
        factors = self._sample(x, record=True)
        out = PATH_REGISTRY[self._select_path(x)].run(self, x, self.weight, factors)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out


def max_cp_rank(out_channels: int, in_per_group: int, taps: int) -> int:
    """The largest rank a CP decomposition of a ``C_out x C_in/g x k*k`` tensor can need: no 3-way tensor has a
    rank above the smallest product of two of its dimensions (every tensor is a sum of that many rank-1 terms)."""
    return min(out_channels * in_per_group, in_per_group * taps, out_channels * taps)


def check_rank(rank: int, out_channels: int, in_per_group: int, taps: int) -> None:
    """ValueError, before anything is allocated, for a rank beyond :func:`max_cp_rank` of the layer's weight
    (``rank=1000000`` sat silent for a minute allocating generator heads of ``R (C_out + C_in/g + k*k)`` outputs)."""
    bound = max_cp_rank(out_channels, in_per_group, taps)
    if rank > bound:
        raise ValueError(f"pedconv: rank {rank} is more than any {out_channels} x {in_per_group} x {taps} weight "
                         f"(C_out x C_in/groups x k*k) can use: its CP rank is at most {bound}; choose rank <= {bound}")


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
    # a follower runs on the leader's generator: a different context pooling would be silently replaced
    for conv in followers:
        for attr in ("context", "sampling", "noise_std"):
            if getattr(conv, attr) != getattr(leader, attr):
                raise ValueError(f"share_generator: all layers need the same {attr}, got "
                                 f"{getattr(leader, attr)!r} and {getattr(conv, attr)!r}")
    for conv in convs:
        conv.__dict__.pop("_lean", None)  # the lean inference applies to unshared layers only
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
        total = sum(heads.total_dim for heads in leader.generator.head_sets())
        leader.infomax_decoder = leader._make_decoder(total).to(device=ref.device, dtype=ref.dtype)


