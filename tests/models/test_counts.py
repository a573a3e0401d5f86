"""Parameter and MAC counts at ImageNet 224 / 1000 classes equal the papers' figures.

Targets (PEDConv, BMVC 2021, Tables 1 and 5, appendix Sec. D, Table 2; DCD, ICLR 2021, Table 4): deploy parameters
within +-0.05M of the printed figure, MACs within +-1%. Two rows are known gaps, kept as strict
xfails (they fail loudly if the gap closes) and listed in docs/counts.md.
"""

from __future__ import annotations

from functools import cache

import pytest

from image_classification.dynamic.pedconv import pedconv_layer_macs, pedconv_layer_params
from image_classification.measurement.macs import count_macs, count_params
from image_classification.models import build_model, conv_sites


@cache
def _counts(arch: str, conv: str, placement: str = "paper") -> tuple:
    model = build_model(arch, conv, placement)
    return count_params(model).deploy, count_macs(model, 224).total


ROWS = [
    # arch, conv, placement, params (M), MACs (M)
    ("resnet18", "static", "paper", 11.7, 1810),
    ("resnet50", "static", "paper", 25.6, 4100),
    ("mobilenet_v1_x1.0", "static", "paper", 4.2, 569),
    ("mobilenet_v2_x1.0", "static", "paper", 3.5, 300),
    ("resnet18", "pedconv", "paper", 11.9, 1830),
    ("mobilenet_v1_x1.0", "pedconv", "paper", 5.1, 579),
    ("mobilenet_v2_x1.0", "pedconv", "paper", 4.8, 307),
    ("mobilenet_v1_x1.0", "pedconv", "pointwise", 4.8, 579),
    ("mobilenet_v1_x1.0", "pedconv", "depthwise", 4.6, 569),
    ("mobilenet_v1_x1.0", "pedconv", "shallow", 4.3, 570),
    ("mobilenet_v1_x1.0", "pedconv", "deep", 5.1, 578),
    ("resnet18", "pedconv:rank=4", "paper", 12.4, 1900),
    ("resnet18", "pedconv:rank=8", "paper", 13.0, 2000),
    ("resnet18", "pedconv:reduction=4", "paper", 12.6, 1840),
]


@pytest.mark.parametrize("arch, conv, placement, params_m, macs_m", ROWS)
def test_counts_match_papers(arch: str, conv: str, placement: str, params_m: float, macs_m: float) -> None:
    params, macs = _counts(arch, conv, placement)
    assert abs(params / 1e6 - params_m) <= 0.05, f"{params / 1e6:.3f}M vs paper {params_m}M"
    assert abs(macs / 1e6 - macs_m) <= 0.01 * macs_m, f"{macs / 1e6:.1f}M vs paper {macs_m}M"


def test_resnet50_pedconv_params_and_formula_macs() -> None:
    params, macs = _counts("resnet50", "pedconv")
    assert abs(params / 1e6 - 28.6) <= 0.05
    # the paper formula applied layer by layer gives exactly our count (static + generator + scaling)
    model = build_model("resnet50")
    static = count_macs(model, 224)
    extra = 0
    for site in conv_sites(model):
        if site.kind in ("pointwise", "full"):
            layer = static.layers[site.name]
            hw = layer // (site.out_channels * site.in_channels * site.kernel_size[0] ** 2)
            extra += pedconv_layer_macs(site.in_channels, site.out_channels, site.kernel_size[0], (hw, 1)) - layer
    assert macs == static.total + extra


@pytest.mark.xfail(strict=True, reason="paper prints 4.2G; the paper's own complexity formula gives 4.13G (-1.6%)")
def test_resnet50_pedconv_macs_paper() -> None:
    assert abs(_counts("resnet50", "pedconv")[1] / 1e6 - 4200) <= 42


@pytest.mark.xfail(strict=True, reason="share_generator keeps per-conv heads: 11.852M vs the paper's 11.8M")
def test_resnet18_partial_sharing_paper() -> None:
    assert abs(_counts("resnet18", "pedconv", "paper+share")[0] / 1e6 - 11.8) <= 0.05


def test_partial_sharing_saves_generator_parameters() -> None:
    shared, macs = _counts("resnet18", "pedconv", "paper+share")
    unshared = _counts("resnet18", "pedconv")[0]
    # per block, conv2 drops its fc_share (C x C/16 + C/16) and its heads take conv1's bottleneck h1
    saved = 0
    for c1, c2 in ((64, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512)):
        h1, h2 = c1 // 16, c2 // 16
        saved += c2 * h2 + h2 + (h2 - h1) * (c2 + c2 + 9)
    assert unshared - shared == saved
    assert abs(macs / 1e6 - 1830) <= 18.3


def test_pedconv_params_follow_the_layer_formula() -> None:
    """Deploy params = static + per-layer generator (C_in C_in/r + C_in/r + C_in/r (C_out + C_in/g + k^2) + heads)."""
    static_model = build_model("mobilenet_v2_x1.0")
    expected = count_params(static_model).deploy
    for site in conv_sites(static_model):
        if site.kind in ("pointwise", "depthwise", "full"):
            k = site.kernel_size[0]
            expected += pedconv_layer_params(site.in_channels, site.out_channels, k, site.groups) - (
                site.out_channels * site.in_channels // site.groups * k * k)
    assert _counts("mobilenet_v2_x1.0", "pedconv")[0] == expected


def test_condconv_efficientnet_b0_block_routing_matches_table1() -> None:
    """PEDConv Table 1 (from the CondConv paper): EfficientNet-B0 CondConv 13.3M / 402M (static 5.3M / 391M):
    K = 4 experts, one routing function per block, every conv of the last three stages (deep+inblock)."""
    params, macs = _counts("efficientnet_b0", "condconv:k=4,routing=block", "deep+inblock")
    static_params, static_macs = _counts("efficientnet_b0", "static")
    assert abs(params / 1e6 - 13.3) <= 0.05, f"{params / 1e6:.3f}M"
    # our static MACs are 1.3% under the printed 391M (SE/activation products); the CondConv increment matches
    assert abs((macs - static_macs) / 1e6 - (402 - 391)) <= 1.0


@pytest.mark.parametrize("arch, conv, placement, params_m, classifier", [
    ("resnet18", "dcd:variant=released", "paper+cls", 14.0, "fc"),  # DCD T4b counts ResNets without the fc
    ("mobilenet_v2_x0.5", "dcd:variant=released,reduction=8", "pointwise+inblock+cls", 3.1, None),
    ("mobilenet_v2_x0.35", "dcd:variant=released,reduction=8", "pointwise+inblock+cls", 2.3, None),
    ("mobilenet_v2_x0.5", "dcd:variant=released,reduction=8", "pointwise+inblock", 2.9, None),  # T3b PW
])
def test_dcd_released_params_match_dcd_tables(arch, conv, placement, params_m, classifier) -> None:
    model = build_model(arch, conv, placement)
    params = count_params(model).deploy
    if classifier:
        params -= count_params(model.get_submodule(classifier)).deploy
    assert abs(params / 1e6 - params_m) <= 0.07, f"{params / 1e6:.3f}M vs DCD {params_m}M"
