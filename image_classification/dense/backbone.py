"""ResNet trunks for dense prediction (detection, segmentation) and dynamic conversion of their heads.

A trunk is this project's classification ResNet (:func:`image_classification.models.build_model`: same
init, PEDConv's BatchNorm gamma 0.5, same placement rules) without its pooling and classifier, optionally
dilated (PSPNet's output stride 8) and optionally started from an ImageNet checkpoint of this project (or a
torchvision state dict), so the backbone of a detector or segmenter is exactly the network of Table 1.

Head convolutions are made dynamic part by part (:func:`convert_parts`): every ``nn.Conv2d`` inside a named
submodule becomes the operator, its static weight becoming the base weight (``conv_from_static``).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from image_classification.dynamic.base import DynamicConv2d
from image_classification.dynamic.registry import conv_from_static, parse_spec
from image_classification.models import build_model, convert_model
from image_classification.models.module_utils import set_module
from image_classification.training.checkpoint import CheckpointError, load_checkpoint, load_model_weights

__all__ = ["RESNET_TRUNKS", "ResNetTrunk", "build_resnet_trunk", "convert_parts", "dilate_stage", "stage_channels"]

#: architectures usable as trunks, with the output channels of layer1..layer4
RESNET_TRUNKS: Dict[str, Sequence[int]] = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}


def stage_channels(arch: str) -> Sequence[int]:
    """Output channels of layer1..layer4 of ``arch`` (ValueError naming the valid trunks)."""
    if arch not in RESNET_TRUNKS:
        raise ValueError(f"unknown backbone {arch!r}; valid: {', '.join(RESNET_TRUNKS)}")
    return RESNET_TRUNKS[arch]


class ResNetTrunk(nn.Module):
    """``conv1 .. layer{last}`` of a torchvision ResNet; ``forward`` returns the requested stage outputs.

    ``return_layers`` names the stages returned (``"layer1"`` .. ``"layer4"``) in an OrderedDict; stages
    after the last requested one are dropped (SSD keeps only up to ``layer3``).
    """

    def __init__(self, resnet: nn.Module, return_layers: Sequence[str]) -> None:
        super().__init__()
        order = ["layer1", "layer2", "layer3", "layer4"]
        bad = [name for name in return_layers if name not in order]
        if bad or not return_layers:
            raise ValueError(f"return_layers must be a non-empty subset of {order}, got {list(return_layers)}")
        last = max(order.index(name) for name in return_layers)
        self.conv1: nn.Module = resnet.get_submodule("conv1")
        self.bn1: nn.Module = resnet.get_submodule("bn1")
        self.relu: nn.Module = resnet.get_submodule("relu")
        self.maxpool: nn.Module = resnet.get_submodule("maxpool")
        self.stages = order[: last + 1]
        for name in self.stages:
            self.add_module(name, getattr(resnet, name))
        self.return_layers = list(return_layers)
        for attr in ("dynamic_convs",):
            if hasattr(resnet, attr):
                self.dynamic_convs = [n for n in getattr(resnet, attr) if n.split(".")[0] in self.stages]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name in self.stages:
            x = getattr(self, name)(x)
            if name in self.return_layers:
                out[name] = x
        return out


def build_resnet_trunk(
    arch: str = "resnet50",
    conv: str = "static",
    placement: str = "paper",
    return_layers: Sequence[str] = ("layer1", "layer2", "layer3", "layer4"),
    dilate: Sequence[bool] = (False, False, False),
    pretrained: Optional[str] = None,
    init: str = "classic",
) -> ResNetTrunk:
    """A ResNet trunk with ``conv`` at ``placement`` (rules of :mod:`image_classification.models.convert`).

    ``dilate``: for layer2..layer4, trade the stage's stride for dilation (:func:`dilate_stage`; PSPNet:
    ``(False, True, True)``, output stride 8). ``pretrained``: an ImageNet checkpoint of this project (its
    arch/operator are checked) or a torchvision state dict; the classifier and any generator the checkpoint
    lacks (e.g. shortcut generators under placement ``all`` from a ``paper`` checkpoint) keep their
    initialisation. Raises
    ValueError (bad names) or CheckpointError (unreadable or mismatching checkpoint).
    """
    stage_channels(arch)
    if len(tuple(dilate)) != 3:
        raise ValueError(f"dilate needs 3 flags (layer2..layer4), got {list(dilate)}")
    model = build_model(arch, conv=conv, placement=placement, init=init)
    if pretrained:  # None or "" (a recipe's value cleared on the command line): no checkpoint
        load_trunk_weights(model, pretrained, arch, conv)
    dilation = 1
    for name, flag in zip(("layer2", "layer3", "layer4"), dilate):
        if flag:
            dilation *= 2
            dilate_stage(getattr(model, name), dilation)
    return ResNetTrunk(model, return_layers)


def dilate_stage(stage: nn.Module, dilation: int) -> None:
    """Replace ``stage``'s stride 2 by ``dilation`` (the dilated ResNets of DeepLab/PSPNet, output stride 8).

    The strided convs get stride 1 (a 3x3 one dilation ``dilation // 2``, the block's previous dilation), the
    other 3x3 convs dilation ``dilation``, padding = dilation: the same network as torchvision's
    ``replace_stride_with_dilation``, but for BasicBlock too and for convs already made dynamic (the weights
    are untouched, so ImageNet checkpoints load the same).
    """
    for module in stage.modules():
        if not isinstance(module, (nn.Conv2d, DynamicConv2d)):
            continue
        kernel = tuple(module.kernel_size)
        if tuple(module.stride) == (2, 2):
            module.stride = (1, 1)
            d = max(1, dilation // 2)
        else:
            d = dilation
        if kernel == (3, 3):
            module.dilation, module.padding = (d, d), (d, d)


def load_trunk_weights(model: nn.Module, path: str, arch: str, conv: str) -> List[str]:
    """Load ``path`` into the classification ResNet ``model`` (non-strict); return the keys left initialised.

    At least the trunk's convolution weights must all be present: a checkpoint of another network is refused.
    """
    checkpoint = dict(load_checkpoint(path))
    state = checkpoint.get("state_dict") if isinstance(checkpoint.get("state_dict"), dict) else checkpoint
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds no state dict")
    # the classifier is not part of the trunk (and may have another number of classes)
    state = {k: v for k, v in state.items() if not re.search(r"(^|\.)fc\.", str(k))}
    checkpoint["state_dict"] = state
    load_model_weights(model, checkpoint, expected_arch=arch, expected_conv=conv, strict=False)
    names = {str(key).split("module.", 1)[-1] for key in state}
    missing = [k for k in model.state_dict() if k not in names and not k.startswith("fc.")]
    conv_weights = [k for k in missing if re.search(r"(^|\.)(conv\d+|downsample\.0)\.weight$", k)]
    if conv_weights:
        raise CheckpointError(f"checkpoint {path} lacks {len(conv_weights)} convolution weights of {arch} "
                              f"(e.g. {conv_weights[0]}); is it a {arch} checkpoint?")
    return missing


def convert_parts(model: nn.Module, conv: str, parts: Iterable[str]) -> List[str]:
    """Make every ``nn.Conv2d`` under the submodules ``parts`` (dotted names) the operator ``conv``.

    Returns the converted conv names (relative to ``model``). Unknown part names raise ValueError listing
    the model's top-level children.
    """
    converted: List[str] = []
    static = parse_spec(conv).is_static
    for part in parts:
        try:
            module = model.get_submodule(part)
        except AttributeError:
            valid = ", ".join(name for name, _ in model.named_children())
            raise ValueError(f"unknown model part {part!r}; valid parts: {valid}") from None
        if static:
            continue
        if type(module) is nn.Conv2d:
            set_module(model, part, conv_from_static(parse_spec(conv), module))
            converted.append(part)
            continue
        before = [name for name, m in module.named_modules() if type(m) is nn.Conv2d]
        if before:
            convert_model(module, conv, "all+stem")
            converted += [f"{part}.{name}" for name in before]
    return converted
