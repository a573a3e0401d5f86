"""scripts/gpu_checks.sh's summary (image_classification/tools/gpu_report.py) from real benchmark/profiler JSON
written with --out-json on the CPU, and the script's refusal without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from image_classification.tools import benchmark, gpu_report, profiler

REPO = Path(__file__).resolve().parents[2]


def test_summary_from_benchmark_and_profiler_outputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "gpu"
    out.mkdir()
    assert benchmark.main(["--ops", "pedconv,dcd", "--shapes", "tiny", "--batch-sizes", "2", "--repeats", "1",
                           "--warmup", "0", "--threads", "1", "--out-json", str(out / "benchmark.json")]) == 0
    assert profiler.main(["--arch", "cifar_resnet20", "--conv", "pedconv", "--num-classes", "10", "--image-size", "16",
                          "--latency", "--threads", "1", "--images", "1", "--warmup", "0", "--train-batch", "2",
                          "--train-steps", "1", "--no-rss", "--out-json", str(out / "profiler_cifar.json")]) == 0
    (out / "profiler_broken.json").write_text("{")  # a stage cut short
    (out / "loader.json").write_text(json.dumps({"markdown": ["| pipeline feeding a resnet18 training step | img/s |",
                                                              "| pytorch -j 12 | 2900 |"]}))
    (out / "stages.tsv").write_text("pytest-cuda\t0\t201\nbenchmark\t124\t90\n")
    (out / "pytest.log").write_text("....s\n==== 12 passed, 1 skipped in 200.1s ====\n")
    capsys.readouterr()
    assert gpu_report.main([str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["rc"] for s in summary["stages"]] == [0, 124]
    assert summary["benchmark_setup"]["complete"] is True and "INCOMPLETE" not in (out / "summary.md").read_text()
    assert summary["pytest"] == "12 passed, 1 skipped in 200.1s"
    layers = {r["op"]: r for r in summary["layers"]}
    assert set(layers) == {"pedconv", "dcd"} and layers["pedconv"]["target"] == gpu_report.LAYER_TRAIN_TARGET
    assert layers["pedconv"]["met"] == (layers["pedconv"]["train_ratio"] <= 1.3) and "met" not in layers["dcd"]
    [net] = [n for n in summary["networks"] if "arch" in n]
    assert net["arch"] == "cifar_resnet20" and net["throughput_ratio"] > 0 and net["target"] is None
    assert sum(net["paths"]["train"].values()) == 18  # every PEDConv layer, with the path it used
    assert {"file": "profiler_broken.json", "error": "missing or incomplete"} in summary["networks"]
    text = (out / "summary.md").read_text()
    assert "| tiny | 2 | pedconv |" in text and "| cifar_resnet20 | pedconv | none | 2 |" in text
    assert "## Input pipeline (loader_benchmark)\n\n| pipeline feeding a resnet18 training step | img/s |" in text
    assert "no triton/triton_pedconv_check.json" in text and text.strip() == capsys.readouterr().out.strip()


def test_targets_by_architecture() -> None:
    assert gpu_report._throughput_target("resnet50") == 0.8
    assert gpu_report._throughput_target("mobilenet_v2_x1.0") == 0.7
    assert gpu_report._throughput_target("cifar_resnet20") is None


def test_out_json_directory_must_exist(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        benchmark.main(["--shapes", "tiny", "--out-json", str(tmp_path / "no" / "b.json")])
    assert info.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        gpu_report.main([str(tmp_path / "missing")])
    assert info.value.code == 2 and "is not a directory" in capsys.readouterr().err


def test_gpu_checks_script_refuses_without_cuda(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    import sys

    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_checks.sh"), str(tmp_path / "out")], cwd=REPO,
                            env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"gpu_checks.sh: error: CUDA is not available to {sys.executable} (these checks need a GPU)"
    )
