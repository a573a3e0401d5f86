"""Per-sample effective weight variation: PEDConv's factored sums against materialised weights, and the CLI."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict

import pytest
import torch

from image_classification.analysis.weights import WeightMoments, _generic_sums
from image_classification.dynamic.pedconv import PEDConv2d, pedconv_weight_sums
from image_classification.tools import weight_variation as weights

SYNTHETIC = ["--data-backend", "synthetic", "--dataset", "fashion-mnist", "-j", "0"]


@pytest.mark.parametrize("options", [
    {}, {"rank": 3}, {"reparam": "additive"}, {"rank": 2, "reparam": "additive", "groups": 2},
    {"components": ("gamma", "psi")},
])
def test_pedconv_sums_equal_materialised_weights(options) -> None:
    torch.manual_seed(0)
    layer = PEDConv2d(4, 6, 3, padding=1, **options).double().eval()
    for p in layer.generator.parameters():
        torch.nn.init.normal_(p, 0.0, 0.5)
    x = torch.randn(5, 4, 6, 6, dtype=torch.float64)
    total, squares, norms = pedconv_weight_sums(layer, x)
    w = layer.dynamic_weight(x)  # B x C_out x C_in/g x k x k, the reference
    torch.testing.assert_close(total, w.sum(0))
    torch.testing.assert_close(squares, (w * w).sum(0))
    torch.testing.assert_close(norms, w.flatten(1).norm(dim=1))
    generic = _generic_sums(layer, x)
    torch.testing.assert_close(generic[0], total)


def test_statistics_definition() -> None:
    torch.manual_seed(1)
    samples = torch.randn(7, 3, 2, dtype=torch.float64) + 2.0
    moments = WeightMoments("x", (3, 2))
    moments.add(samples[:3].sum(0), (samples[:3] ** 2).sum(0), samples[:3].flatten(1).norm(dim=1))
    moments.add(samples[3:].sum(0), (samples[3:] ** 2).sum(0), samples[3:].flatten(1).norm(dim=1))
    stats = moments.statistics()
    mean = samples.mean(0)
    expected = math.sqrt(float(samples.var(0, unbiased=False).sum())) / float(mean.norm())
    norms = samples.flatten(1).norm(dim=1)
    assert stats["relative_variation"] == pytest.approx(expected)
    assert stats["norm_cv"] == pytest.approx(float(norms.std(unbiased=False) / norms.mean()))


@pytest.mark.slow
def test_cli(checkpoints: Dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for conv in ("pedconv", "dcd"):
        out = tmp_path / conv
        assert weights.main([*SYNTHETIC, "--checkpoint", str(checkpoints[conv]), "--images", "6", "-b", "3",
                             "--out", str(out)]) == 0
        assert (out / "weights.png").stat().st_size > 1000
        rows = list(csv.DictReader((out / "weights.csv").open()))
        assert len(rows) == 18 and {r["images"] for r in rows} == {"6"} and {r["operator"] for r in rows} == {conv}
        assert all(float(r["relative_variation"]) > 0 for r in rows)
    assert weights.main([*SYNTHETIC, "--checkpoint", str(checkpoints["static"]), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"{weights.PROG}: error:") and "per-sample weight" in err
