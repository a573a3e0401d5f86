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

Sizes (``C_b = in_channels / (groups * blocks)``, defaults when the option is 0; ``sizing=paper``):

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

The authors' release (``variant=released``)
--------------------------------------------
The authors' code (liyunsheng13/dcd: ``conv_basic_dy``/``conv_dy``/``DYCls`` of
``models/imagenet/resnet_dcd.py``, ``DYModule``/``DYCls`` of ``models/imagenet/mobilenetv2_dcd.py``)
differs from the equations in these ways; ``variant=released`` does every one of them, so a
released state dict converted by :func:`convert_released_state_dict` gives the released outputs
(tested against an independent re-implementation, forward, backward and BatchNorm statistics):

1. **BatchNorm and an identity inside the dynamic residual**: ``P (BN2(Phi BN1(Q^T x)) +
   BN1(Q^T x))`` instead of ``P Phi Q^T x``; in eval mode both BatchNorms are affine, so this is
   ``P (I + diag(s2) Phi) (diag(s1) Q^T x + c1) + P c2`` - still a per-sample weight, plus a
   per-sample bias (:meth:`DCDConv2d.dynamic_bias`).
2. **Gated activation in the dynamic branch**: ``h = FC1(ctx); h = h * hsigmoid(G h)`` (an SE-like
   gate, ``G`` an ``s x s`` FC without bias) where the paper says "an activation layer" and
   ``variant=paper`` uses ReLU.
3. **Latent and context sizes** (``sizing``; ``auto`` picks the rule of the released module that
   the enclosing block uses when a model is converted, ``resnet_bottleneck`` for a lone layer):

   - ``resnet_basic`` (``conv_basic_dy``, ResNet-18/34 3x3 convs): 2x2 pooled context,
     ``L = floor(sqrt(4 C_b))``, ``s = max(4 C_in, L^2) // r`` - the paper variant's 3x3 rule;
   - ``resnet_bottleneck`` (``conv_dy``, every ResNet-50 conv, 1x1 and 3x3): global pooling,
     ``L = floor(sqrt(C_b))`` (11 at 128 channels, 22 at 512, 45 at 2048, where the paper's formula
     gives 16, 32, 64), ``s = max(C_in, L^2) // r``;
   - ``mobilenetv2`` (``DYModule``, MobileNetV2 1x1 convs): expanding convs (C_in < C_out) pool 2x2
     and start from ``L = min(4 C_in // 8, C_out // 8)``, the others pool globally and start from
     ``min(C_in // 2, C_out // 2)``; the divisor doubles while ``L^2 > 2 C_in pool^2``; L >= 4;
     ``s = max(C_in pool^2, L^2) // r`` (the release's ``--fc-squeeze``, 8 by default, 16 for its
     x1.0 checkpoint). The release keeps MobileNetV2's first block (expansion 1) and its 1x1
     head conv static: ``variant=released`` leaves the first static when it converts a model,
     placement ``pointwise+inblock+cls`` the second.

   ``s`` is at least 4 (``conv_dy``: at least 1; it has no floor, and no ResNet width reaches one).
4. **The bias is scaled by Lambda**: the release computes ``Lambda (W0 x + b)`` (its classifier has
   a bias; its convs have none), the paper variant ``Lambda W0 x + b``.
5. **The classifier** (``DYCls``, :class:`DCDLinear` with ``variant=released``) has a fixed latent
   size 32 and hidden width 32 at every input width (the paper variant: L from section 3.2 and
   ``in // r``, e.g. 64 and 128 for ResNet-50's 2048 features), with the same gate, BatchNorms and
   identity.

The released models, ``paper+cls`` on ResNets and ``pointwise+inblock+cls`` on MobileNetV2: ResNet-50
29.84M (27.56M without its classifier; DCD Table 4 prints 30.7M), ResNet-18 14.06M without its
classifier (14.0M), MobileNetV2 x0.5 / x0.35 at r = 8 3.06M / 2.27M (3.1M / 2.3M), x1.0 at r = 16
5.72M (5.5M); every MobileNetV2 x0.5 row of DCD Tables 1 and 3b within 0.05M (docs/counts.md).

Initialisation: P and Q are drawn as the release draws its 1x1 ``q``/``p`` convs (normal, std
``sqrt(2 / out_channels)``). Not reproduced: its MobileNetV2's N(0, 0.01) for every Linear (the
dynamic branch keeps PyTorch's default here) and its fixed ``AvgPool2d(7)`` (torchvision's adaptive
pooling equals it at 224 px). The release has no depthwise or joint form: ``variant=released``
refuses them.

Execution (``module.path``, chosen automatically; set it to ``"branch"`` or ``"fold"`` to force one):

* ``branch`` (batch > 1, channel and joint forms): W(x) is never synthesized. The static conv runs,
  and ``P Phi Q^T x`` is computed on activations - Q^T on the centre-tap
  samples of the input (a strided view for 'same' padding), Phi applied in the latent space - both
  as one batched matmul with the per-sample ``L x C`` matrix ``Phi_b Q^T`` (joint form: a Q^T 1x1
  conv, a depthwise conv with the L_k kernels of R, then a batched Phi matmul) - and P's
  up-projection is accumulated into ``Lambda * conv(x, W0) + b`` by one ``baddbmm``. Released
  variant in training: Q^T, BN1, Phi, BN2 run one after the other on the latent activations (the
  BatchNorms need them); in eval they fold into the per-sample ``L x C`` matrix as above.
* ``fold`` (batch 1, and depthwise layers at any batch): ``W(x)`` costs about as much as the static
  weight (for depthwise layers it is ``B x C x k^2``, the size of a static depthwise weight), so it
  is synthesized and applied in one conv (``groups = B * groups`` when B > 1) - at batch 1 DCD then
  costs one dense conv plus the dynamic branch. The released variant folds in eval mode only.

Every path equals the per-sample reference ``F.conv2d(x_b, W(x)_b)`` with
:meth:`DCDConv2d.dynamic_weight` (tested to 1e-5, forward and backward).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base import DynamicConv2d
from ..protocol import ExportRoute, ForeignLayout, OperatorProtocol, PerSampleUnfoldConv2d
from ..registry import ConvSpec, Option, register_operator

__all__ = [
    "DCDConv2d",
    "DCDLinear",
    "default_latent",
    "released_sizes",
    "convert_released_state_dict",
    "is_released_state_dict",
    "RELEASED_LAYOUT",
    "PATHS",
    "SIZINGS",
    "VARIANTS",
]

PATHS = ("auto", "branch", "fold")
VARIANTS = ("paper", "released")
#: latent/context/hidden size rules: the paper's, and those of the three released modules
SIZINGS = ("auto", "paper", "resnet_basic", "resnet_bottleneck", "mobilenetv2")
#: latent size and hidden width of the released classifier (``DYCls``), whatever its input width
RELEASED_CLASSIFIER_WIDTH = 32


def default_latent(channels: int) -> int:
    """Paper default latent size ``floor(C / 2^floor(log2 sqrt(C)))`` (section 3.2), at least 1."""
    if channels <= 1:
        return 1
    return max(1, channels // 2 ** int(math.floor(math.log2(math.sqrt(channels)))))


def released_sizes(sizing: str, in_channels: int, out_channels: int, reduction: int, pool: int = 0,
                   latent: int = 0) -> Tuple[int, int, int]:
    """``(pool, L, s)`` of a channel-fusion layer under one of the released modules' rules.

    ``sizing``: ``resnet_basic`` (``conv_basic_dy``), ``resnet_bottleneck`` (``conv_dy``) or
    ``mobilenetv2`` (``DYModule``); see the module docstring. ``in_channels``/``out_channels`` are
    per diagonal block; a non-zero ``pool`` or ``latent`` replaces the rule's value.
    """
    if sizing == "mobilenetv2":
        expanding = in_channels < out_channels
        pool = pool or (2 if expanding else 1)
        ctx = in_channels * pool * pool
        if not latent:
            divisor = 8 if expanding else 2
            latent = min(ctx // divisor, out_channels // divisor)
            while latent * latent > 2 * ctx:
                divisor *= 2
                latent = min(ctx // divisor, out_channels // divisor)
            latent = max(latent, 4)
    elif sizing in ("resnet_basic", "resnet_bottleneck"):
        pool = pool or (2 if sizing == "resnet_basic" else 1)
        ctx = in_channels * pool * pool
        latent = latent or max(1, math.isqrt(ctx))
    else:
        raise ValueError(
            f"released_sizes: sizing must be resnet_basic, resnet_bottleneck or mobilenetv2, got {sizing!r}"
        )
    floor = 1 if sizing == "resnet_bottleneck" else 4  # conv_dy has no floor (0 would be no layer at all)
    return pool, latent, max(floor, max(ctx, latent * latent) // reduction)


def _lambda_act(z: torch.Tensor) -> torch.Tensor:
    """The authors' h-sigmoid for Lambda: ``relu6(z + 3) / 3`` in [0, 2], equal to 1 at z = 0."""
    return F.relu6(z + 3.0) / 3.0


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``scale * z + shift`` (running statistics)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _uses_batch_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    return bn.training or bn.running_mean is None


def _branch_hidden(fc1: nn.Linear, gate: Optional[nn.Linear], ctx: torch.Tensor) -> torch.Tensor:
    """First stage of the dynamic branch: ReLU(FC1 ctx) (paper), or the release's SE-like gate
    ``h * hsigmoid(G h)`` with ``h = FC1 ctx``."""
    h = fc1(ctx)
    return F.relu(h) if gate is None else h * _lambda_act(gate(h))



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


# ------------------------------------------------------------------------------------------------
# The released checkpoints' layout
# ------------------------------------------------------------------------------------------------
#: inside one released dynamic layer: its parameter names -> this project's (fc_scale/fc_phi are
#: stacked into fc2 separately). Convs (conv_dy, conv_basic_dy, DYModule) and the classifier (DYCls).
_RELEASED_CONV_PARTS = {"conv.weight": "weight", "q.weight": "Q", "conv_q.weight": "Q", "p.weight": "P",
                        "conv_p.weight": "P"}
_RELEASED_CLS_PARTS = {"cls.weight": "linear.weight", "cls.bias": "linear.bias", "cls_q.weight": "Q.weight",
                       "cls_p.weight": "P.weight"}
_RELEASED_COMMON_PARTS = {"fc.0.weight": "fc1.weight", "fc.1.fc.0.weight": "gate.weight"}
_RELEASED_BN = {"bn1": "bn_q", "bn2": "bn_phi"}
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
#: tonylins-style MobileNetV2 (the release's) block indices -> torchvision's ``conv`` indices
_MBV2_EXPANDING = {0: "0.0", 1: "0.1", 3: "1.0", 4: "1.1", 6: "2", 7: "3"}
_MBV2_NO_EXPANSION = {0: "0.0", 1: "0.1", 3: "1", 4: "2"}


def is_released_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True when ``state_dict`` (or its ``'state_dict'`` entry) has the DCD release's layer names."""
    inner = state_dict.get("state_dict")
    keys = list(inner if isinstance(inner, Mapping) else state_dict)
    return any(str(k).endswith(".fc_scale.weight") for k in keys)


def _released_layer_part(layer: str, part: str, is_classifier: bool) -> str:
    table = {**_RELEASED_COMMON_PARTS, **(_RELEASED_CLS_PARTS if is_classifier else _RELEASED_CONV_PARTS)}
    if part in table:
        return table[part]
    bn, _, field = part.partition(".")
    if bn in _RELEASED_BN and field in _BN_FIELDS:
        return f"{_RELEASED_BN[bn]}.{field}"
    raise ValueError(f"convert_released_state_dict: unknown parameter {layer}.{part} in a released DCD layer")


def _released_module_path(path: str, layout: str, expanding: set, last_block: int) -> str:
    """A released module path -> torchvision's (ResNet: classifier -> fc; MobileNetV2: see _MBV2_*)."""
    parts = path.split(".")
    if parts[0] == "classifier" and len(parts) >= 2 and parts[1].isdigit():
        return ".".join(["fc" if layout == "resnet" else "classifier.1", *parts[2:]])
    if layout == "resnet":
        return path
    if parts[0] == "features" and len(parts) >= 2 and parts[1].isdigit():
        index = int(parts[1])
        if index == 0:
            return path
        if len(parts) >= 4 and parts[2] == "conv" and parts[3].isdigit():
            table = _MBV2_EXPANDING if index in expanding else _MBV2_NO_EXPANSION
            if int(parts[3]) in table:
                return ".".join(["features", str(index), "conv", table[int(parts[3])], *parts[4:]])
    elif parts[0] == "conv" and len(parts) >= 2 and parts[1] in ("0", "1"):
        return ".".join(["features", str(last_block + 1), *parts[1:]])
    raise ValueError(f"convert_released_state_dict: cannot place {path!r} of the released MobileNetV2 in "
                     "torchvision's MobileNetV2")


def convert_released_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Map a state dict of the DCD authors' release onto this project's ``dcd:variant=released`` models.

    Accepts the checkpoint dict itself (a ``'state_dict'`` entry is unwrapped) and strips a
    ``module.`` prefix. Two layouts are recognised, by their keys:

    * ``resnet_dcd.py`` (``layer1...``): module paths are torchvision's; the classifier
      ``classifier.<i>`` (after an optional dropout) becomes ``fc``. Load it into
      ``build_model("resnet50", "dcd:variant=released", "paper+cls")`` (or resnet18/34/101).
    * ``mobilenetv2_dcd.py`` (``features...``, tonylins' MobileNetV2): block indices are mapped onto
      torchvision's ``InvertedResidual.conv`` numbering, the last 1x1 conv ``conv.{0,1}`` becomes
      ``features.<n>``, the classifier ``classifier.1``. Load it into
      ``build_model("mobilenet_v2_x1.0", "dcd:variant=released,reduction=16", "pointwise+cls")``
      (``reduction`` = the release's ``--fc-squeeze``: 16 for its x1.0 checkpoint).

    Inside each dynamic layer: ``conv`` -> ``weight`` (W0), ``q``/``conv_q`` -> ``Q``, ``p``/``conv_p``
    -> ``P``, ``fc.0`` -> ``fc1``, ``fc.1.fc.0`` (the gate) -> ``gate``, ``[fc_scale; fc_phi]`` ->
    ``fc2`` (Lambda rows first, then Phi row-major, the order both use), ``bn1``/``bn2`` ->
    ``bn_q``/``bn_phi``; classifier ``cls`` -> ``linear``, ``cls_q``/``cls_p`` -> ``Q``/``P``.
    Anything it cannot place raises ValueError naming the key; nothing is guessed.
    """
    inner = state_dict.get("state_dict")
    source = inner if isinstance(inner, Mapping) else state_dict
    plain = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in source.items()}
    layers = sorted({k.rsplit(".", 2)[0] for k in plain if k.endswith((".fc_phi.weight", ".fc_scale.weight"))},
                    key=len, reverse=True)
    if not layers:
        raise ValueError("convert_released_state_dict: no DCD layer (no '.fc_scale.weight' key) in this state dict")
    if any(k.startswith("layer1.") for k in plain):
        layout = "resnet"
    elif any(k.startswith("features.") for k in plain):
        layout = "mobilenetv2"
    else:
        raise ValueError("convert_released_state_dict: neither the release's ResNet ('layer1.') nor its MobileNetV2 "
                         "('features.') layout")
    expanding = {int(k.split(".")[1]) for k in plain
                 if k.startswith("features.") and k.split(".")[2:4] in (["conv", "6"], ["conv", "7"])}
    blocks = [int(k.split(".")[1]) for k in plain if k.startswith("features.") and k.split(".")[1].isdigit()]
    last_block = max(blocks, default=0)

    converted: Dict[str, Any] = {}
    stacked: Dict[str, Dict[str, Any]] = {}
    for key, value in plain.items():
        layer = next((name for name in layers if key.startswith(name + ".")), None)
        if layer is None:
            path, dot, leaf = key.rpartition(".")
            converted[_released_module_path(path, layout, expanding, last_block) + dot + leaf if dot else key] = value
            continue
        part = key[len(layer) + 1:]
        target = _released_module_path(layer, layout, expanding, last_block)
        if part in ("fc_scale.weight", "fc_phi.weight"):
            stacked.setdefault(target, {})[part] = value
            continue
        is_classifier = f"{layer}.cls.weight" in plain
        converted[f"{target}.{_released_layer_part(layer, part, is_classifier)}"] = value
    for target, pieces in stacked.items():
        missing = [name for name in ("fc_scale.weight", "fc_phi.weight") if name not in pieces]
        if missing:
            raise ValueError(f"convert_released_state_dict: released layer {target} has no {missing[0]} "
                             "(the release always has both Lambda and Phi heads)")
        converted[f"{target}.fc2.weight"] = torch.cat([pieces["fc_scale.weight"], pieces["fc_phi.weight"]], 0)
    return converted


#: the DCD authors' release (``fc_scale``/``fc_phi`` ...), loaded through :func:`convert_released_state_dict`
RELEASED_LAYOUT = ForeignLayout(
    description="the DCD release's layout",
    detect=is_released_state_dict,
    convert=convert_released_state_dict,
    accepts=lambda spec: spec.name == "dcd" and spec.options.get("variant") == "released",
    mismatch=("{label} is in the DCD release's layout: build the model with --conv dcd:variant=released (not {conv}) "
              "and --placement paper+cls (ResNet) or pointwise+inblock+cls (MobileNetV2)"),
    foreign_arch=lambda arch: str(arch).endswith("_dcd"),  # the release's own names: resnet50_dcd, mobilenetv2_dcd
)


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
    """Dynamic convolution decomposition, Eq. 6-9 of Li et al. (2021); see the module docstring."""

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
        self.variant = variant
        if sizing == "auto":
            sizing = "paper" if variant == "paper" else "resnet_bottleneck"
        self.sizing = sizing
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
        if variant == "released" and form != "channel":
            raise ValueError(f"DCDConv2d: variant=released has no {form} form (the authors' release has channel "
                             "fusion only and keeps depthwise convs static); use variant=paper or leave this conv "
                             "static")
        if sizing != "paper" and form != "channel":
            raise ValueError(f"DCDConv2d: sizing={sizing} applies to the channel-fusion form only, not {form}")
        self.form = form
        self.mode = mode
        self.path = "auto"  # execution path, see forward(); set to "branch" or "fold" to force one
        self.weight = nn.Parameter(torch.empty(out_channels, cin_g, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None

        self.blocks = blocks if form != "depthwise" else 1  # Eq. 7 splits channels; Eq. 8 fuses taps
        self.num_blocks = groups * self.blocks if form != "depthwise" else 1
        if form != "depthwise" and (cin_g % self.blocks or cout_g % self.blocks):
            raise ValueError(
                f"DCDConv2d: blocks ({blocks}) must divide in_channels/groups ({cin_g}) and "
                f"out_channels/groups ({cout_g})"
            )
        cb = in_channels // self.num_blocks if form != "depthwise" else in_channels
        self.latent_kernel = 0
        if form in ("joint", "depthwise"):
            self.latent_kernel = latent_kernel or taps // 2
            if self.latent_kernel >= taps + 1 or self.latent_kernel < 1:
                raise ValueError(f"DCDConv2d: latent_kernel must be in 1..{taps}, got {self.latent_kernel}")
        if sizing != "paper":
            self.pool, self.latent, self.hidden = released_sizes(sizing, cb, out_channels // self.num_blocks,
                                                                 reduction, pool, latent)
            if self.num_blocks > 1:  # the rules are per block; the branch sees the whole input
                floor = 1 if sizing == "resnet_bottleneck" else 4
                self.hidden = max(floor, max(in_channels * self.pool ** 2, self.num_blocks * self.latent ** 2)
                                  // reduction)
            n_phi = self.num_blocks * self.latent ** 2
        else:
            self.pool = pool or (2 if form == "channel" and taps > 1 else 1)
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
            self.hidden = max(4, in_channels * self.pool ** 2 // reduction)
        if not self.use_phi:
            n_phi = 0
        self.n_phi = n_phi
        n_lambda = out_channels if self.use_lambda else 0
        ctx = in_channels * self.pool ** 2
        self.fc1 = nn.Linear(ctx, self.hidden, bias=False)
        # the release's SE-like gate on the hidden vector (variant=released) instead of ReLU
        self.gate = nn.Linear(self.hidden, self.hidden, bias=False) if variant == "released" else None
        self.fc2 = nn.Linear(self.hidden, n_lambda + n_phi, bias=False)
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
        if kind == "InvertedResidual":
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
        out = self.fc2(_branch_hidden(self.fc1, self.gate, ctx))
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

    def _released_affine(self, phi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode released residual as an affine map of the centre samples.

        ``BN2(Phi BN1(Q^T x)) + BN1(Q^T x) = M (s1 Q^T x + c1) + c2`` with ``M = I + diag(s2) Phi``:
        returns the per-sample ``M diag(s1) Q^T`` (B x nb x L x C_b) and ``M c1 + c2`` (B x nb x L).
        """
        assert self.bn_q is not None and self.bn_phi is not None
        nb, L = self.num_blocks, self.latent
        s1, c1 = _bn_affine(self.bn_q)
        s2, c2 = _bn_affine(self.bn_phi)
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
        if self.variant == "released" and self.bn_q is not None and _uses_batch_stats(self.bn_q):
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
        batch_stats = self.bn_q is not None and _uses_batch_stats(self.bn_q)
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
        return _coefficient_table(*self.coefficients(x))

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


def _coefficient_table(lam: Optional[torch.Tensor], phi: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    if lam is not None:
        out["lambda"] = lam.reshape(lam.shape[0], -1)
    if phi is not None:
        out["Phi"] = phi.reshape(phi.shape[0], -1)
    return out


class DCDLinear(nn.Module, OperatorProtocol):
    """Dynamic classifier ('CLS' in DCD Table 3b): a drop-in for nn.Linear, Eq. 6 on a 1x1 input.

    ``y = Lambda(x) * (W0 x) + b + P Phi(x) Q^T x`` with the dynamic branch FC(in -> s) -> ReLU ->
    FC(s -> out + L^2), ``s = max(4, in // reduction)`` and ``L`` the paper default
    (512 features -> L = 32, s = 32, as in the authors' classifier).
    Extra parameters: ``in*L + L*out + in*s + s*(out + L^2)``.

    ``variant=released`` is the release's ``DYCls``: ``y = Lambda (W0 x + b) + P (BN2(Phi BN1(Q^T x))
    + BN1(Q^T x))``, the gated branch ``h * hsigmoid(G h)``, and L = s = 32 at any input width
    (module docstring, items 1, 2, 4, 5); ``reduction`` is then unused.
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
        out = self.fc2(_branch_hidden(self.fc1, self.gate, x))
        lam = _lambda_act(out[:, : self.out_features]) if self.use_lambda else None
        phi_start = self.out_features if self.use_lambda else 0
        phi = out[:, phi_start:].reshape(-1, self.latent, self.latent) if self.use_phi else None
        return lam, phi

    def _released_affine(self, phi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Eval mode: ``M diag(s1) Q^T`` (B x L x in) and ``M c1 + c2`` (B x L), ``M = I + diag(s2) Phi``."""
        assert self.bn_q is not None and self.bn_phi is not None
        if _uses_batch_stats(self.bn_q):
            raise ValueError("DCDLinear: variant=released has a per-sample weight in eval mode only (its BatchNorms "
                             "use batch statistics in training); call .eval()")
        s1, c1 = _bn_affine(self.bn_q)
        s2, c2 = _bn_affine(self.bn_phi)
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
        return _coefficient_table(*self.coefficients(x))

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
