"""The profiler CLI: counts, JSON, table rows, latency plumbing and one-line errors."""

from __future__ import annotations

import json

import pytest

from image_classification import profile


def test_counts_json(capsys: pytest.CaptureFixture) -> None:
    assert profile.main(["--arch", "cifar_resnet20", "--conv", "pedconv", "--num-classes", "10", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["image_size"] == 32 and report["dynamic_layers"] == 18
    assert report["params_training"] > report["params_deploy"] > report["static_params_deploy"]
    assert report["macs"] > report["static_macs"] > 0


def test_text_output(capsys: pytest.CaptureFixture) -> None:
    profile.main(["--arch", "mobilenet_v1_x0.25", "--conv", "pedconv", "--placement", "deep", "--image-size", "64"])
    out = capsys.readouterr().out
    assert "params (deploy)" in out and "MACs" in out and "static baseline" in out


def test_table_rows_compare_with_papers() -> None:
    rows = [r for r in profile.PAPER_ROWS if r.arch == "mobilenet_v1_x1.0" and r.placement == "depthwise"]
    [row] = profile.table_rows("pedconv", rows)
    assert row["params_m"] == 4.6 and abs(row["diff_params_m"]) <= 0.05 and abs(row["diff_macs_pct"]) <= 1
    assert profile.table_rows("dcd", rows) == []
    assert {r.table for r in profile.PAPER_ROWS} == {"pedconv", "dcd", "odconv"}


def test_latency_measures_ratios_tiny() -> None:
    res = profile.measure_latency("cifar_resnet20", "pedconv", image_size=16, num_classes=10, threads=1, images=3,
                                  warmup=1, train_batch=4, train_steps=1, train_warmup=0)
    for key in ("infer_ratio", "train_ratio", "memory_ratio"):
        assert res[key] > 0
    assert res["train_mem_mb_dynamic"] > res["train_mem_mb_static"]


@pytest.mark.parametrize("argv, match", [
    (["--arch", "resnet19"], "unknown arch 'resnet19'"),
    (["--arch", "resnet18", "--placement", "middle"], "unknown placement token"),
    (["--arch", "resnet18", "--conv", "nope"], "unknown operator 'nope'"),
    (["--arch", "resnet18", "--image-size", "0"], "--image-size must be >= 1"),
    (["--table", "xyz"], "invalid choice"),
    ([], "--arch is required"),
])
def test_bad_input_exits_2_with_one_line(argv: list, match: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        profile.main(argv)
    assert info.value.code == 2
    assert match in capsys.readouterr().err.strip().splitlines()[-1]
