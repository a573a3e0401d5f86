"""The device check script of the Triton PEDConv kernels: layer extraction, totals, reports, a smoke
run in Triton's interpreter, and the ahead-of-time sm_90 compilation report (no GPU needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from image_classification.dynamic.pedconv.triton import unavailable_reason  # noqa: E402
from image_classification.tools import triton_pedconv_check as check  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_resnet18_layer_shapes() -> None:
    layers = check.network_layers("resnet18", image_size=64)
    assert len(layers) == 7 and sum(layer.count for layer in layers) == 16  # every block conv, paper placement
    first, down = layers[0], layers[1]
    assert (first.in_channels, first.out_channels, first.kernel, first.stride, first.height, first.count) == (
        64, 64, (3, 3), (1, 1), 16, 4)
    assert (down.in_channels, down.out_channels, down.stride, down.height) == (64, 128, (2, 2), 16)
    assert first.name == "r18 64->64 3x3 s1 @16"


def test_network_totals_weight_layers_by_count() -> None:
    spec = dict(net="n", count=3)
    rows = [check.LayerResult(layer=spec, ms={"static_fwd": 1.0, "triton_fwd": 2.0, "static_train": 2.0,
                                              "triton_train": 3.0}),
            check.LayerResult(layer=dict(net="n", count=1), ms={"static_fwd": 1.0, "triton_fwd": 1.0,
                                                                "static_train": 2.0, "triton_train": 2.0})]
    totals = check.network_totals(rows)["n"]
    assert totals["static_fwd_ms"] == 4.0 and totals["triton_fwd_ms"] == 7.0
    assert totals["triton_fwd_ratio"] == pytest.approx(7 / 4) and totals["triton_train_ratio"] == pytest.approx(11 / 8)


def test_budget_exhausted_reports_the_unmeasured_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if unavailable_reason(DEVICE) is not None:
        pytest.skip(unavailable_reason(DEVICE))
    rc = check.main(["--smoke", "--skip-exactness", "--budget-s", "0", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "triton_pedconv_check.json").read_text())
    assert report["layers"] == [] and report["skipped"] == [s.name for s in check.smoke_layers()]
    assert "Not measured (time budget)" in (tmp_path / "triton_pedconv_check.md").read_text()
    assert (tmp_path / "raport.json").read_text().startswith("DLLL ")


@pytest.mark.slow
def test_smoke_run_times_and_checks_a_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if unavailable_reason(DEVICE) is not None:
        pytest.skip(unavailable_reason(DEVICE))
    monkeypatch.setattr(check, "smoke_layers", lambda: [check.LayerSpec("smoke", 8, 12, (3, 3), (2, 2), (1, 1),
                                                                        (1, 1), 5, 7, count=2)])
    rc = check.main(["--smoke", "--skip-exactness", "--fold", "--repeats", "1", "--warmup", "1",
                     "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "triton_pedconv_check.json").read_text())
    (layer,) = report["layers"]
    assert set(layer["ms"]) == {"static_fwd", "triton_fwd", "static_train", "triton_train", "fold_fwd", "fold_train"}
    assert all(value > 0 for value in layer["ms"].values())
    assert set(layer["errors"]) == {"forward", "grad_x", "grad_weight", "grad_gamma", "grad_phi", "grad_psi"}
    assert max(layer["errors"].values()) < 1e-2
    assert report["networks"]["smoke"]["static_train_ms"] == pytest.approx(2 * layer["ms"]["static_train"])
    assert "| smoke 8->12 3x3 s2 @5 | 2 |" in (tmp_path / "triton_pedconv_check.md").read_text()


@pytest.mark.slow
def test_ptx_report_compiles_every_kernel_for_sm90(tmp_path: Path) -> None:
    """Ahead-of-time compilation for Hopper with Triton's bundled ptxas: catches compile errors of the
    GPU kernels (which the interpreter does not see) and checks that the tiles use wgmma."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "image_classification.tools.triton_pedconv_check", "--ptx-report",
                           "--tiles", "heuristic", "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "triton_pedconv_ptx.json").read_text())
    assert {row["kernel"] for row in rows} == {"fwd", "bwd_input", "bwd_weight", "grad_gamma"}
    for row in rows:
        assert "error" not in row and 0 < row["registers"] <= 255
        assert row["wgmma"] == (row["kernel"] != "grad_gamma"), row


def test_shell_wrapper_runs_the_check(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", "scripts/gpu_check_triton_pedconv.sh", str(tmp_path), "--smoke", "--skip-exactness",
                           "--budget-s", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if unavailable_reason(DEVICE) is not None:
        assert proc.returncode == 2 and "triton_pedconv_check: error:" in proc.stdout + proc.stderr
        return
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for name in ("nvidia-smi.txt", "check.log", "triton_pedconv_check.json", "triton_pedconv_check.md", "raport.json"):
        assert (tmp_path / name).exists(), name
