"""The profiler CLI: counts, JSON, table rows, latency plumbing and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from image_classification.measurement import latency, paper_tables
from image_classification.tools import profiler


def test_counts_json(capsys: pytest.CaptureFixture) -> None:
    assert profiler.main(["--arch", "cifar_resnet20", "--conv", "pedconv", "--num-classes", "10", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["image_size"] == 32 and report["dynamic_layers"] == 18
    assert report["params_training"] > report["params_deploy"] > report["static_params_deploy"]
    assert report["macs"] > report["static_macs"] > 0


def test_text_output(capsys: pytest.CaptureFixture) -> None:
    profiler.main(["--arch", "mobilenet_v1_x0.25", "--conv", "pedconv", "--placement", "deep", "--image-size", "64"])
    out = capsys.readouterr().out
    assert "params (deploy)" in out and "MACs" in out and "static baseline" in out


def test_table_rows_compare_with_papers() -> None:
    rows = [r for r in paper_tables.PAPER_ROWS if r.arch == "mobilenet_v1_x1.0" and r.placement == "depthwise"]
    [row] = paper_tables.table_rows("pedconv", rows)
    assert row["params_m"] == 4.6 and abs(row["diff_params_m"]) <= 0.05 and abs(row["diff_macs_pct"]) <= 1
    assert paper_tables.table_rows("dcd", rows) == []
    assert {r.table for r in paper_tables.PAPER_ROWS} == {"pedconv", "dcd", "odconv"}


def test_latency_measures_ratios_tiny() -> None:
    res = latency.measure_latency("cifar_resnet20", "pedconv", image_size=16, num_classes=10, threads=1, images=3,
                                  warmup=1, train_batch=4, train_steps=1, train_warmup=0)
    for key in ("infer_ratio", "train_ratio", "memory_ratio"):
        assert res[key] > 0
    assert res["train_mem_mb_dynamic"] > res["train_mem_mb_static"]


@pytest.mark.parametrize("argv, match", [
    (["--arch", "resnet19"], "unknown arch 'resnet19'"),
    (["--arch", "resnet18", "--placement", "middle"], "unknown placement token"),
    (["--arch", "resnet18", "--conv", "nope"], "unknown operator 'nope'"),
    (["--arch", "resnet18", "--image-size", "0"], "--image-size: must be a positive integer, got 0"),
    (["--table", "xyz"], "invalid choice"),
    ([], "--arch is required"),
])
def test_bad_input_exits_2_with_one_line(argv: list, match: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        profiler.main(argv)
    assert info.value.code == 2
    assert match in capsys.readouterr().err.strip().splitlines()[-1]


def test_latency_reports_paths_and_peak_rss_tiny() -> None:
    res = latency.measure_latency("cifar_resnet20", "pedconv", image_size=16, num_classes=10, threads=1, images=2,
                                  warmup=1, train_batch=4, train_steps=1, train_warmup=0, peak_rss=True)
    layers = {r["layer"] for r in res["paths"]}
    assert len(layers) == 18 and {r["mode"] for r in res["paths"]} == {"train", "eval"}
    assert {r["input"].split("x")[0] for r in res["paths"]} == {"1", "4"}
    assert all(r["source"] == "heuristic" for r in res["paths"])  # the suite runs with tuning off
    if res["rss_mb_static"] is not None:  # Linux
        assert res["rss_mb_static"] > 0 and res["rss_mb_dynamic"] > 0 and res["rss_ratio"] > 0


def test_latency_compiled_tiny() -> None:
    """--compile plumbing (the ``eager`` backend here, Dynamo's capture alone: AOTAutograd is tested per operator
    and through main.py, inductor in tests/dynamic/test_compile.py): both models compiled, the frozen batch-1
    figures present. ResNet-10 (9 convolutions, not ResNet-20's 19) halves the tracing."""
    res = latency.measure_latency("resnet10", "pedconv", image_size=16, num_classes=10, threads=1, images=2,
                                  warmup=1, train_batch=4, train_steps=1, train_warmup=1, compile=True,
                                  compile_backend="eager")
    assert res["compile"] and res["infer_ratio"] > 0 and res["infer_ratio_frozen"] > 0 and res["train_ratio"] > 0


def test_cli_prints_paths(capsys: pytest.CaptureFixture) -> None:
    assert profiler.main(["--arch", "cifar_resnet20", "--conv", "pedconv", "--num-classes", "10", "--image-size", "16",
                         "--latency", "--threads", "1", "--images", "1", "--warmup", "0", "--train-batch", "2",
                         "--train-steps", "1", "--print-paths", "--no-rss", "--no-autotune"]) == 0
    out = capsys.readouterr().out
    assert "PEDConv paths by heuristic" in out and "layer1.0.conv1" in out and "heuristic" in out


def test_latency_with_amp_channels_last_reports_throughput_tiny() -> None:
    res = latency.measure_latency("cifar_resnet20", "pedconv", image_size=16, num_classes=10, threads=1, images=2,
                                  warmup=1, train_batch=4, train_steps=2, train_warmup=0, amp="bf16",
                                  channels_last=True)
    assert res["device"] == "cpu" and res["amp"] == "bf16" and res["channels_last"]
    for key in ("static", "dynamic"):
        assert res[f"train_img_s_{key}"] == pytest.approx(4e3 / res[f"train_ms_{key}"], rel=1e-6)
    assert res["throughput_ratio"] == pytest.approx(1 / res["train_ratio"], rel=1e-6)
    assert "train_peak_mb_static" not in res  # CUDA only


def test_cuda_device_without_cuda_exits_2(capsys: pytest.CaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(SystemExit) as info:
        profiler.main(["--arch", "resnet18", "--latency", "--device", "cuda"])
    assert info.value.code == 2
    assert "--device cuda given but CUDA is not available" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_cuda_latency_amp_channels_last(amp: str, capsys: pytest.CaptureFixture) -> None:
    assert profiler.main(["--arch", "cifar_resnet20", "--conv", "pedconv", "--num-classes", "10", "--image-size", "32",
                          "--latency", "--device", "cuda", "--amp", amp, "--channels-last", "--images", "5",
                          "--warmup", "2", "--train-batch", "16", "--train-steps", "3", "--json"]) == 0
    lat = json.loads(capsys.readouterr().out)["latency"]
    assert lat["device"] == "cuda" and lat["amp"] == amp
    assert lat["throughput_ratio"] > 0 and lat["peak_memory_ratio"] > 0 and lat["train_peak_mb_dynamic"] > 0


def test_latency_shows_progress_and_ctrl_c_is_one_line(capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["--arch", "cifar_resnet20", "--conv", "pedconv", "--num-classes", "10", "--image-size", "16", "--latency",
            "--threads", "1", "--images", "2", "--warmup", "0", "--train-batch", "2", "--train-steps", "1", "--no-rss",
            "--no-autotune", "--json"]
    assert profiler.main(argv) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # progress stays off standard output
    for line in ("[latency] cifar_resnet20 static and pedconv: calibrating BatchNorm statistics",
                 "timing batch-1 inference (static and dynamic, interleaved, 0 warm-up): 2 image(s) ...",
                 "timing batch-2 training steps (static and dynamic, interleaved, 2 warm-up): done (3 step(s)"):
        assert line in captured.err
    monkeypatch.setattr(latency, "_time_inference", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert profiler.main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1] == (
        "profiler: interrupted; nothing measured is printed (a latency ratio needs every step)")
