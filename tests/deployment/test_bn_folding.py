"""fold_batchnorm: exact for every operator it folds (float64, eval mode), refusals keep the pair with a
reason, pairs come from the data flow."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from small_nets import SmallConvNet

from image_classification.deployment.bn_folding import batchnorm_affine, fold_batchnorm
from image_classification.dynamic import OPERATORS, DynamicConv2d, list_operators
from image_classification.models import build_model, convert_model

FOLDED = ["static", "pedconv", "pedconv:rank=2,components=gamma+psi", "pedconv_spatial", "dcd", "dcd:mode=joint",
          "dyconv", "odconv", "odconv:k=3"]
NOT_FOLDED = {
    "pedconv:reparam=additive": "additive reparameterization",
    "condconv": "do not sum to 1",
    "involution:group_channels=4": "without projection",
}


def tiny(spec: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = convert_model(SmallConvNet(conv2_bias=True), spec, "all").double()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("spec", FOLDED)
def test_folded_model_equals_the_original(spec: str) -> None:
    model = tiny(spec)
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    folded = copy.deepcopy(model)
    report = fold_batchnorm(folded)
    assert len(report.folded) == 5 and not report.skipped, report.summary()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spec, reason", NOT_FOLDED.items())
def test_inexact_operators_are_left_with_a_reason(spec: str, reason: str) -> None:
    model = tiny(spec)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = fold_batchnorm(model)
    assert report.folded[0].startswith("stem + bn0")
    assert report.skipped and all(reason in why for _, why in report.skipped)
    assert reason in report.summary()
    refused = tuple(pair.split(" + ")[0] + "." for pair, _ in report.skipped)
    refused += tuple(pair.split(" + ")[1] + "." for pair, _ in report.skipped)
    for key, value in model.state_dict().items():  # refused pairs are untouched
        if key.startswith(refused):
            torch.testing.assert_close(value, before[key])
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


def test_involution_with_projection_folds_into_it() -> None:
    model = tiny("involution:group_channels=4")
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    report = fold_batchnorm(model)
    assert any(name.startswith("conv4 + bn4 (involution)") for name in report.folded)  # 8 -> 12: projection
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spec", ["static", "pedconv", "odconv:k=2"])
def test_whole_cifar_resnet(spec: str) -> None:
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", spec, num_classes=10).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.bias, 0.0, 0.1)
    model.eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        report = fold_batchnorm(model)
        assert len(report.folded) == 19
        torch.testing.assert_close(model(x), expected, rtol=1e-9, atol=1e-9)


def test_only_dataflow_pairs_are_folded() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)  # used by bn and by the sum: not foldable
            z = self.conv2(self.bn(y) + y)
            return self.bn2(torch.relu(z))  # BN after a ReLU: not a conv -> BN pair

    model = Shared().eval()
    report = fold_batchnorm(model)
    assert report.folded == [] and isinstance(model.bn, nn.BatchNorm2d) and isinstance(model.bn2, nn.BatchNorm2d)


def test_errors_and_untraceable_models() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(tiny("static").train())

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    model = Branchy().eval()
    report = fold_batchnorm(model)
    assert report.folded == [] and "could not trace" in report.note
    no_stats = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)).eval()
    assert "running statistics" in fold_batchnorm(no_stats).skipped[0][1]
    bn = nn.BatchNorm2d(3).eval()
    scale, shift = batchnorm_affine(bn)
    torch.testing.assert_close(bn(torch.ones(1, 3, 1, 1)).flatten(), scale + shift)
    for name in list_operators():  # every dynamic operator decides its own folding
        cls = OPERATORS[name].cls
        assert not issubclass(cls, DynamicConv2d) or callable(getattr(cls, "fold_output_affine", None)), name
