"""Adding an operator is one file plus its registration: a toy operator, defined here and registered for
this test only, runs through build_model, the MAC counter and the profiler, a checkpoint save/load and
``main.py`` (synthetic data, one short epoch) with nothing else in the project edited."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Iterator, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from image_classification.dynamic import (
    DynamicConv2d,
    Option,
    list_operators,
    register_operator,
    unregister_operator,
)

REPO = Path(__file__).resolve().parents[2]
TOY = "toy_gated"


# ---------------------------------------------------------------- the new operator: one file's worth of code
class ToyGatedConv2d(DynamicConv2d):
    """``y = conv(x, W) * (gain * sigmoid(FC(GAP(x))))``: a per-sample output-channel gate (a toy SE-conv)."""

    default_bn_gamma = 0.25  # build_model(bn_gamma="auto") asks the operator

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Tuple[int, int], stride=1, padding=0,
                 dilation=1, groups=1, bias=True, gain: float = 2.0) -> None:  # noqa: ANN001
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels // groups, kh, kw) * 0.1)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.gate = nn.Linear(in_channels, out_channels)
        self.gain = gain

    def load_static_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None and self.bias is not None:
                self.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight, None, groups=self.groups, **self.conv_kwargs())
        y = y * (self.gain * torch.sigmoid(self.gate(x.mean((2, 3)))))[:, :, None, None]
        return y if self.bias is None else y + self.bias[:, None, None]

    def macs(self, input_shape: Tuple[int, ...]) -> int:
        return self.static_macs(input_shape) + int(input_shape[0]) * self.in_channels * self.out_channels


@pytest.fixture
def toy_operator() -> Iterator[str]:
    register_operator(TOY, options={"gain": Option(float, 2.0, "gate scale", minimum=0.0)})(ToyGatedConv2d)
    try:
        yield TOY
    finally:
        unregister_operator(TOY)
    assert TOY not in list_operators()


def test_build_count_profile_and_checkpoint(toy_operator: str, tmp_path: Path) -> None:
    from image_classification.measurement.macs import count_macs
    from image_classification.measurement.paper_tables import profile_model
    from image_classification.models import build_model
    from image_classification.training.checkpoint import load_model_weights, save_checkpoint

    torch.manual_seed(0)
    model = build_model("cifar_resnet20", f"{toy_operator}:gain=1.5", "paper", num_classes=3, in_chans=1)
    toys = [m for m in model.modules() if isinstance(m, ToyGatedConv2d)]
    assert toys and all(m.gain == 1.5 for m in toys) and len(model.dynamic_convs) == len(toys)
    assert all(float(bn.weight.detach()[0]) == 0.25 for bn in model.modules() if isinstance(bn, nn.BatchNorm2d))

    static = build_model("cifar_resnet20", "static", "paper", num_classes=3, in_chans=1)
    extra = count_macs(model, 16, in_chans=1).total - count_macs(static, 16, in_chans=1).total
    assert extra == sum(m.in_channels * m.out_channels for m in toys)  # the gates, through the toy's macs()
    row = profile_model("cifar_resnet20", toy_operator, "paper", 16, num_classes=3, in_chans=1)
    assert row["macs"] == count_macs(model, 16, in_chans=1).total and row["dynamic_layers"] == len(toys)

    path = save_checkpoint({"state_dict": model.state_dict(), "arch": "cifar_resnet20",
                            "conv": f"{toy_operator}:gain=1.5"}, tmp_path, filename="toy.pth.tar")
    torch.manual_seed(1)
    again = build_model("cifar_resnet20", f"{toy_operator}:gain=1.5", "paper", num_classes=3, in_chans=1)
    load_model_weights(again, path, expected_arch="cifar_resnet20", expected_conv=f"{toy_operator}:gain=1.5")
    model.eval(), again.eval()
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_main_trains_one_epoch(toy_operator: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from image_classification.training.checkpoint import load_checkpoint

    ws = tmp_path / "ws"
    argv = ["main.py", "--data-backend", "synthetic", "--arch", "cifar_resnet20", "--image-size", "16", "-b", "4",
            "-j", "0", "--num-classes", "3", "--epochs", "1", "--prof", "2", "--conv", toy_operator,
            "--workspace", str(ws)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "main.py"), run_name="__main__")
    assert done.value.code == 0
    saved = load_checkpoint(ws / "checkpoint.pth.tar")
    assert saved["conv"] == toy_operator and saved["epoch"] == 1
    assert any(key.endswith(".gate.weight") for key in saved["state_dict"])
