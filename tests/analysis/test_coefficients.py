"""Dynamic-coefficient variance (DCD Fig. 6) against direct computation, and the CLI."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict

import pytest
import torch
import torch.nn as nn

from image_classification.analysis.coefficients import collect_coefficients, layer_coefficients, stats_rows
from image_classification.dynamic.pedconv import PEDConv2d
from image_classification.dynamic.peers.dcd import DCDConv2d
from image_classification.tools import coefficients

SYNTHETIC = ["--data-backend", "synthetic", "--dataset", "fashion-mnist", "-j", "0"]


def _net(layer: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    stem = nn.Conv2d(3, layer.in_channels, 3, padding=1)
    for p in layer.parameters():
        if p.dim() == 2:  # generator weights: spread the coefficients
            nn.init.normal_(p, 0.0, 0.5)
    return nn.Sequential(stem, layer).double()


@pytest.mark.parametrize("make,components", [
    (lambda: PEDConv2d(8, 6, 3, padding=1, rank=2), ("gamma", "phi", "psi")),
    (lambda: PEDConv2d(8, 6, 3, padding=1, components=("phi",)), ("phi",)),
    (lambda: DCDConv2d(8, 8, 1), ("lambda", "Phi")),
])
def test_sigma_is_mean_entry_variance_normalised_by_input_variance(make, components) -> None:
    net = _net(make())
    batches = [(torch.randn(5, 3, 6, 6, dtype=torch.float64), None) for _ in range(3)]
    stats = collect_coefficients(net, batches, hist_images=4)
    [row_layer] = stats
    rows = {r["component"]: r for r in stats_rows(stats)}
    assert tuple(rows) == components
    with torch.no_grad():
        inputs = torch.cat([net[0](x) for x, _ in batches])
        direct = layer_coefficients(net[1].eval(), inputs)
    input_var = float(inputs.var(unbiased=False))
    for comp, values in direct.items():
        sigma = float(values.var(dim=0, unbiased=False).mean())
        assert rows[comp]["images"] == 15 and rows[comp]["entries"] == values.shape[1]
        assert rows[comp]["sigma"] == pytest.approx(sigma, rel=1e-6)
        assert rows[comp]["input_var"] == pytest.approx(input_var, rel=1e-9)
        assert rows[comp]["normalized_sigma"] == pytest.approx(sigma / input_var, rel=1e-6)
        assert sigma > 0
        # histograms keep the values of the first hist_images images
        assert stats[row_layer].samples[comp][0].numel() == 4 * values.shape[1]


def test_pedconv_eval_coefficients_are_deterministic_sigmoids() -> None:
    layer = PEDConv2d(4, 4, 3, padding=1).eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        first, second = layer_coefficients(layer, x), layer_coefficients(layer, x)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(0 < float(v.min()) and float(v.max()) < 1 for v in first.values())
    assert layer_coefficients(nn.Conv2d(4, 4, 3), x) is None


@pytest.mark.slow
def test_cli_writes_png_and_csv(checkpoints: Dict[str, Path], tmp_path: Path) -> None:
    for conv in ("pedconv", "dyconv"):  # DCD's Lambda/Phi: test_sigma_is_mean_entry_variance_...
        out = tmp_path / conv
        assert coefficients.main([*SYNTHETIC, "--checkpoint", str(checkpoints[conv]), "--images", "12", "-b", "4",
                                  "--hist-images", "5", "--out", str(out)]) == 0
        assert (out / "coefficients.png").stat().st_size > 1000
        rows = list(csv.DictReader((out / "coefficients.csv").open()))
        expected = {"pedconv": {"gamma", "phi", "psi"}, "dyconv": {"pi"}}[conv]
        assert {r["component"] for r in rows} == expected and {r["images"] for r in rows} == {"12"}
        assert len({r["layer"] for r in rows}) == 18 and all(float(r["sigma"]) >= 0 for r in rows)


def test_cli_errors(checkpoints: Dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert coefficients.main([*SYNTHETIC, "--checkpoint", str(checkpoints["static"]), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no dynamic layer" in err
    (tmp_path / "file").write_text("x")
    assert coefficients.main([*SYNTHETIC, "--checkpoint", str(checkpoints["pedconv"]),
                              "--out", str(tmp_path / "file")]) == 2
    assert "cannot create output directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        coefficients.main([*SYNTHETIC, "--checkpoint", str(checkpoints["pedconv"]), "--out", str(tmp_path),
                           "--bins", "0"])
    assert exc.value.code == 2
