"""PSPNet / UperNet: the paper's parameter counts (Table 3), outputs, dynamic parts, bad names."""

from __future__ import annotations

import pytest
import torch

from image_classification.dynamic.pedconv import PEDConv2d
from image_classification.measurement.macs import count_params
from image_classification.segmentation import build_segmenter


def _params(name: str, conv: str, **kw) -> float:
    return count_params(build_segmenter(name, conv, **kw)).deploy / 1e6


@pytest.mark.parametrize("name,conv,paper", [
    ("upernet", "static", 64.1), ("upernet", "pedconv", 72.3), ("pspnet", "static", 51.5), ("pspnet", "pedconv", 59.7),
])
def test_paper_parameter_counts(name: str, conv: str, paper: float) -> None:
    """PEDConv Table 3 at 150 classes, deploy parameters (info-max decoders excluded), within 0.05M."""
    assert abs(_params(name, conv) - paper) <= 0.05


@pytest.mark.slow
def test_other_head_configurations() -> None:
    """The alternatives named in the docs: an equal-count UperNet variant, and the uniform rule."""
    alt = _params("upernet", "pedconv", trunk_placement="paper", dynamic_parts=("ppm", "ppm_bottleneck", "fuse"))
    assert abs(alt - 72.3) <= 0.05
    assert abs(_params("upernet", "pedconv", dynamic_parts=("all",)) - 73.09) <= 0.01
    assert abs(_params("pspnet", "pedconv", dynamic_parts=()) - 54.82) <= 0.01  # head static


def test_outputs_and_dynamic_parts() -> None:
    torch.manual_seed(0)
    psp = build_segmenter("pspnet", "pedconv", num_classes=5, backbone="resnet18").train()
    out = psp(torch.randn(2, 3, 40, 48))
    assert set(out) == {"out", "aux"} and out["out"].shape == (2, 5, 40, 48) == out["aux"].shape
    assert isinstance(psp.classifier, PEDConv2d) and isinstance(psp.head[0][0], PEDConv2d)
    assert "backbone.layer2.0.downsample.0" in psp.dynamic_convs  # trunk placement 'all'
    psp.eval()
    with torch.no_grad():
        assert set(psp(torch.randn(1, 3, 32, 32))) == {"out"}
    upn = build_segmenter("upernet", "pedconv", num_classes=5, backbone="resnet18").eval()
    assert isinstance(upn.fpn_in[0][0], PEDConv2d) and not isinstance(upn.fuse[0], PEDConv2d)
    with torch.no_grad():
        assert upn(torch.randn(1, 3, 64, 64))["out"].shape == (1, 5, 64, 64)
    static = build_segmenter("upernet", "static", num_classes=5, backbone="resnet18")
    assert static.dynamic_convs == [] and static.dynamic_parts == ()


def test_bad_names() -> None:
    with pytest.raises(ValueError, match="unknown segmenter 'deeplab'; valid: pspnet, upernet"):
        build_segmenter("deeplab")
    with pytest.raises(ValueError, match="unknown upernet part 'aux_head'"):
        build_segmenter("upernet", "pedconv", backbone="resnet18", dynamic_parts=("aux_head",))
    with pytest.raises(ValueError, match="num_classes"):
        build_segmenter("pspnet", num_classes=0)
    with pytest.raises(ValueError, match="unknown operator"):
        build_segmenter("pspnet", "nope")
