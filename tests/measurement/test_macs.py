"""The MAC counter against hand-computed single-layer figures."""

from __future__ import annotations

import torch.nn as nn

from image_classification.dynamic import build_conv
from image_classification.dynamic.pedconv import pedconv_layer_macs
from image_classification.measurement.macs import count_macs, count_params


def test_static_conv_linear_depthwise_by_hand() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 32, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    report = count_macs(model, (20, 30))
    assert report.layers == {"0": 10 * 15 * 16 * 3 * 9, "2": 10 * 15 * 16 * 9, "3": 10 * 15 * 32 * 16, "6": 320}
    assert report.total == sum(report.layers.values())


def test_pedconv_layer_is_the_paper_complexity_formula() -> None:
    """HW Cout Cin k^2 + (2Cin + Cout + k^2) Cin/r + 2 Cout Cin k^2 (PEDConv, BMVC 2021, Sec. 3 "Complexity
    analysis", r = 16)."""
    conv = build_conv("pedconv", 64, 128, 3, stride=2, padding=1, bias=False)
    macs = count_macs(nn.Sequential(conv), 16, in_chans=64).total
    h = w = 8
    by_hand = h * w * 128 * 64 * 9 + (2 * 64 + 128 + 9) * 64 // 16 + 2 * 128 * 64 * 9
    assert macs == by_hand == pedconv_layer_macs(64, 128, 3, (8, 8))


def test_pedconv_rank_and_depthwise() -> None:
    conv = build_conv("pedconv:rank=4", 32, 32, 3, padding=1, groups=32, bias=False)
    macs = count_macs(nn.Sequential(conv), 8, in_chans=32).total
    hidden = 4  # max(32 // 16, 4)
    by_hand = 8 * 8 * 32 * 9 + 32 * hidden + hidden * 4 * (32 + 1 + 9) + 2 * 4 * 32 * 1 * 9
    assert macs == by_hand


def test_deploy_params_exclude_the_infomax_decoder() -> None:
    conv = build_conv("pedconv", 64, 64, 3, bias=False)
    counts = count_params(nn.Sequential(conv))
    decoder = sum(p.numel() for p in conv.infomax_decoder.parameters())
    assert decoder > 0 and counts.training - counts.deploy == decoder
    assert counts.deploy == 64 * 64 * 9 + 64 * 4 + 4 + 4 * (64 + 64 + 9) + (64 + 64 + 9)

