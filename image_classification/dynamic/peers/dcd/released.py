"""The DCD authors' released checkpoints (liyunsheng13/dcd): their layer names mapped onto this project's
``dcd:variant=released`` models, and the foreign layout the checkpoint loader detects them by."""

from __future__ import annotations

from typing import Any, Dict, Mapping

import torch

from ...protocol import ForeignLayout

__all__ = ["RELEASED_LAYOUT", "convert_released_state_dict", "is_released_state_dict"]

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

