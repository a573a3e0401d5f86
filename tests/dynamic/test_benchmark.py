"""The operator micro-benchmark CLI runs end to end on a tiny shape."""

from __future__ import annotations

import json

import pytest

from image_classification.dynamic import benchmark


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
