"""What PEDConv and spatial PEDConv share (dynamic/pedconv/common.py): one declaration, one log-variance init."""

from __future__ import annotations

import math

import pytest
import torch

from image_classification.dynamic import OPERATORS, build_conv
from image_classification.dynamic.pedconv.common import (
    CP_OPTIONS,
    SAMPLING_OPTIONS,
    BaseWeightInfomaxConv2d,
    logvar_init_bias,
)

CP_OPERATORS = ("pedconv", "pedconv_spatial")


def _logvar_heads(module):
    return [m for name, m in module.named_modules() if name.endswith("_logvar")]


def test_options_and_base_class_are_declared_once() -> None:
    for name in CP_OPERATORS:
        entry = OPERATORS[name]
        assert issubclass(entry.cls, BaseWeightInfomaxConv2d)
        for key, option in {**CP_OPTIONS, **SAMPLING_OPTIONS}.items():
            assert entry.options[key] is option, (name, key)


@pytest.mark.parametrize("name", CP_OPERATORS)
@pytest.mark.parametrize("noise_std", [0.1, 0.0])
def test_both_operators_start_the_learned_log_variance_at_the_same_bias(name: str, noise_std: float) -> None:
    m = build_conv(name, 8, 8, 3, padding=1, sampling="learned", noise_std=noise_std)
    heads = _logvar_heads(m)
    assert len(heads) == 3
    expected = 2 * math.log(noise_std) if noise_std > 0 else 2 * math.log(1e-9)
    assert logvar_init_bias(noise_std) == pytest.approx(expected)
    for head in heads:
        torch.testing.assert_close(head.bias, torch.full_like(head.bias, expected))
    assert logvar_init_bias(0.0) == pytest.approx(-41.4465, abs=1e-4)


def _factor_drift(name: str, bias: float | None) -> float:
    """Largest |train-mode factor - eval-mode factor| with sampling=learned, noise_std=0 (float32)."""
    torch.manual_seed(0)
    m = build_conv(name, 16, 16, 3, padding=1, sampling="learned", noise_std=0.0, infomax=False)
    if bias is not None:
        for head in _logvar_heads(m):
            torch.nn.init.constant_(head.bias, bias)
    x = torch.randn(4, 16, 6, 6)
    with torch.no_grad():
        m.eval()
        mean = torch.cat([f.flatten() for f in m.factors(x)])
        m.train()
        torch.manual_seed(1)
        sampled = torch.cat([f.flatten() for f in m.factors(x)])
    return float((sampled - mean).abs().max())


@pytest.mark.parametrize("name", CP_OPERATORS)
def test_noise_std_zero_learned_sampling_adds_no_visible_noise(name: str) -> None:
    """``sampling=learned,noise_std=0`` starts where ``fixed,noise_std=0`` stays: no noise at float32
    resolution (the sampled std is 1e-9); the former -20.0 bias (std 4.5e-5) moved factors by ~1e-5."""
    assert _factor_drift(name, None) < 1e-7
    assert _factor_drift(name, -20.0) > 1e-6  # the test tells the two biases apart
