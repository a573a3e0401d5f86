"""The operator micro-benchmark CLI runs end to end on a tiny shape."""

from __future__ import annotations

import json

import pytest
import torch

from image_classification.tools import benchmark


def test_cli_json_on_tiny_shape(capsys):
    code = benchmark.main(["--ops", "dcd,dyconv,condconv,involution", "--shapes", "tiny", "--batch-sizes", "1,2",
                           "--repeats", "1", "--warmup", "0", "--threads", "1", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["rows"]
    assert {(r["op"], r["batch"]) for r in rows} == {
        (op, b) for op in ("dcd", "dyconv", "condconv", "involution") for b in (1, 2)
    }
    for r in rows:
        assert r["note"] == ""
        assert r["fwd_ratio"] > 0 and r["train_ratio"] > 0 and r["mem_ratio"] > 0
        assert r["static_fwd_ms"] > 0


def test_table_output_and_skip_note(capsys):
    benchmark.SHAPES["tiny-odd"] = benchmark.LayerShape("tiny-odd", 12, 12, 3, 1, 1, 1, 6)
    try:
        benchmark.main(["--ops", "involution,dyconv", "--shapes", "tiny-odd", "--batch-sizes", "2",
                        "--repeats", "1", "--warmup", "0", "--threads", "1"])
    finally:
        del benchmark.SHAPES["tiny-odd"]
    out = capsys.readouterr().out
    assert "fwd x" in out and "ratios to nn.Conv2d" in out
    assert "involution" in out and "skipped: " in out and "group_channels" in out  # 12 % 16 != 0
    assert any(line.split()[2:3] == ["dyconv"] for line in out.splitlines())


def test_bad_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--ops", "nope"])
    assert "unknown operator(s) nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main(["--shapes", "huge"])
    assert "unknown shape(s) huge" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main(["--batch-sizes", "0"])


def test_amp_channels_last_and_throughput_on_cpu(capsys):
    code = benchmark.main(["--ops", "pedconv,dcd", "--shapes", "tiny", "--batch-sizes", "2", "--repeats", "1",
                           "--warmup", "0", "--threads", "1", "--amp", "bf16", "--channels-last", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["amp"] == "bf16" and report["channels_last"] and report["device"] == "cpu"
    for r in report["rows"]:
        assert r["note"] == "" and r["train_ratio"] > 0
        assert r["train_img_s"] == pytest.approx(2 / (r["train_ratio"] * r["static_train_ms"] / 1e3), rel=1e-6)
        assert r["static_train_img_s"] == pytest.approx(2 / (r["static_train_ms"] / 1e3), rel=1e-6)


def test_all_paths_skips_a_path_that_cannot_run_here(capsys, monkeypatch):
    """--all-paths times every registered PEDConv path; off CUDA (interpreter off) triton is skipped with
    its one-line reason, and the table carries the img/s column."""
    from image_classification.dynamic.pedconv import triton as triton_pedconv
    from image_classification.dynamic.pedconv.paths import PATH_REGISTRY

    monkeypatch.setattr(triton_pedconv, "interpreting", lambda: False)
    args = benchmark.parse_args(["--ops", "pedconv", "--all-paths"])
    assert args.ops == ["pedconv", *(f"pedconv:path={p}" for p in PATH_REGISTRY if p != "reference")]
    benchmark.main(["--ops", "pedconv:path=fold,pedconv:path=triton", "--shapes", "tiny", "--batch-sizes", "1",
                    "--repeats", "1", "--warmup", "0", "--threads", "1"])
    out = capsys.readouterr().out
    assert "img/s" in out
    [line] = [line for line in out.splitlines() if "pedconv:path=triton" in line]
    assert "skipped: pedconv: path=triton cannot run this layer: device 'cpu' needs TRITON_INTERPRET=1" in line


def test_cuda_device_without_cuda_is_a_one_line_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(SystemExit) as info:
        benchmark.main(["--device", "cuda", "--shapes", "tiny"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("--device cuda given but CUDA is not available "
                                                                       f"(torch {torch.__version__}) (see --help)")
    with pytest.raises(SystemExit):
        benchmark.main(["--amp", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


@pytest.mark.cuda
def test_cuda_benchmark_fp16_channels_last_every_path(capsys):
    code = benchmark.main(["--ops", "pedconv,dcd", "--all-paths", "--shapes", "tiny,r18-3x3-64@56",
                           "--batch-sizes", "1,8", "--repeats", "2", "--device", "cuda", "--amp", "fp16",
                           "--channels-last", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "cuda" and report["amp"] == "fp16"
    rows = {(r["shape"], r["op"], r["batch"]): r for r in report["rows"]}
    triton = rows[("r18-3x3-64@56", "pedconv:path=triton", 8)]
    assert triton["note"] == "" and triton["train_ratio"] > 0 and triton["mem_ratio"] > 0


def test_progress_callback_after_every_shape_and_batch():
    seen = []
    rows = benchmark.run_benchmark(["dcd"], ["tiny"], (1, 2), repeats=1, warmup=0, on_progress=seen.append)
    assert [len(r) for r in seen] == [1, 2] and seen[-1] == rows


def test_default_operators_at_batch_1_include_odconv_without_a_training_step(capsys):
    """docs/performance.md's first benchmark line: odconv is a default operator and cannot train at batch 1 (its
    attention's BatchNorm): its inference is timed, its training columns say why they are empty, exit 0."""
    code = benchmark.main(["--shapes", "tiny", "--batch-sizes", "1,2", "--repeats", "1", "--warmup", "0",
                           "--threads", "1", "--json"])
    assert code == 0
    rows = {(r["op"], r["batch"]): r for r in json.loads(capsys.readouterr().out)["rows"]}
    single = rows[("odconv", 1)]
    assert single["fwd_ratio"] > 0 and single["train_ratio"] is None and single["mem_ratio"] is None
    assert single["train_note"].startswith("train skipped: ODConv2d: the attention's BatchNorm needs at least 2")
    assert rows[("odconv", 2)]["train_ratio"] > 0 and rows[("odconv", 2)]["train_note"] == ""
    assert all(r["fwd_ratio"] > 0 and r["note"] == "" for r in rows.values())


def test_ctrl_c_prints_the_rows_measured_so_far_and_exits_130(capsys, monkeypatch, tmp_path):
    """Progress goes to stderr from the start (JSON on stdout stays parseable); an interrupt in the second
    (shape, batch) cell prints the first cell's rows, marks the JSON file incomplete and exits 130."""
    real, calls = benchmark._measure, {"n": 0}

    def measure(*args, **kwargs):  # noqa: ANN002, ANN003
        calls["n"] += 1
        if calls["n"] == 3:  # the forward timing of the second cell
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(benchmark, "_measure", measure)
    out_json = tmp_path / "rows.json"
    code = benchmark.main(["--ops", "dcd", "--shapes", "tiny", "--batch-sizes", "1,2", "--repeats", "1", "--warmup",
                           "0", "--threads", "1", "--json", "--out-json", str(out_json)])
    captured = capsys.readouterr()
    assert code == 130 and "Traceback" not in captured.err
    assert "[1/2] tiny batch 1: 2 modules" in captured.err and "[2/2] tiny batch 2" in captured.err
    assert "benchmark: interrupted; the 1 row(s) measured so far follow (also in" in captured.err
    report = json.loads(captured.out)
    assert not report["complete"] and [(r["op"], r["batch"]) for r in report["rows"]] == [("dcd", 1)]
    assert json.loads(out_json.read_text()) == report
