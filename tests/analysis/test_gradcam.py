"""Grad-CAM against a hook-free reference of Selvaraju et al. Eq. 1-2, and the side-by-side CLI."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict

import pytest
import torch
import torch.nn.functional as F

from image_classification.analysis.gradcam import GradCAM, cam_statistics, default_target_layer
from image_classification.models import build_model
from image_classification.tools import gradcam

SYNTHETIC = ["--data-backend", "synthetic", "--dataset", "fashion-mnist", "-j", "0"]


def _reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Grad-CAM by splitting the CIFAR ResNet by hand at layer3: A = features(x), y = head(A) (float64)."""
    a = model.layer3(model.layer2(model.layer1(F.relu(model.bn1(model.conv1(x))))))
    a = a.detach().requires_grad_(True)
    logits = model.fc(torch.flatten(F.adaptive_avg_pool2d(a, 1), 1))
    classes = logits.argmax(1)
    cams = []
    for b in range(x.shape[0]):
        (g,) = torch.autograd.grad(logits[b, classes[b]], a, retain_graph=True)
        alpha = g[b].mean(dim=(1, 2))  # Eq. 1
        cams.append(F.relu((alpha[:, None, None] * a[b]).sum(0)))  # Eq. 2
    cam = F.interpolate(torch.stack(cams)[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return cam / cam.flatten(1).max(1).values.view(-1, 1, 1)


@pytest.mark.parametrize("conv", ["static", "pedconv"])
def test_gradcam_matches_reference(conv: str) -> None:
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", conv=conv, num_classes=10).double().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    assert default_target_layer(model) == "layer3"
    cam, logits, classes = GradCAM(model)(x)
    assert cam.shape == (3, 16, 16) and float(cam.min()) >= 0 and torch.allclose(cam.flatten(1).max(1).values,
                                                                                    torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(cam, _reference(model, x))
    assert torch.equal(classes, logits.argmax(1))


def test_default_layer_of_torchvision_models_and_statistics() -> None:
    assert default_target_layer(build_model("resnet18", num_classes=10)) == "layer4"
    assert default_target_layer(build_model("mobilenet_v2_x0.35", num_classes=10)) == "features"
    cam = torch.zeros(5, 5)
    cam[4, 0] = 1.0
    assert cam_statistics(cam) == {"peak_y": 1.0, "peak_x": 0.0, "concentration": 1.0}


def test_cli_side_by_side(checkpoints: Dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "gc"
    assert gradcam.main([*SYNTHETIC, "--checkpoints", str(checkpoints["static"]), str(checkpoints["pedconv"]),
                         "--labels", "static", "PEDConv", "--images", "3", "--out", str(out)]) == 0
    assert (out / "gradcam.png").stat().st_size > 1000
    rows = list(csv.DictReader((out / "gradcam.csv").open()))
    assert len(rows) == 6 and {r["model"] for r in rows} == {"static", "PEDConv"}
    assert all(0.0 <= float(r["probability"]) <= 1.0 and 0 < float(r["concentration"]) <= 1 for r in rows)
    assert gradcam.main([*SYNTHETIC, "--checkpoints", str(checkpoints["dcd"]), "--target", "label",
                         "--layer", "layer2", "--images", "2", "--out", str(out)]) == 0


def test_cli_errors_one_line(checkpoints: Dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = [*SYNTHETIC, "--out", str(tmp_path / "o")]
    assert gradcam.main([*base, "--checkpoints", str(tmp_path / "missing.pth.tar")]) == 2
    assert gradcam.main([*base, "--checkpoints", str(checkpoints["static"]), "--layer", "layer9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith(f"{gradcam.PROG}: error:") for line in err)
    assert "missing.pth.tar" in err[0] and "no layer 'layer9'" in err[1]
    with pytest.raises(SystemExit) as exc:
        gradcam.main([*base, "--checkpoints", str(checkpoints["static"]), "--labels", "a", "b"])
    assert exc.value.code == 2 and "--labels gives 2 names for 1 checkpoints" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gradcam.main([*base, "--checkpoints", str(checkpoints["static"]), "--images", "0"])
