"""The Fashion-MNIST study's report (image_classification/reporting/fashion_mnist_study.py): summary rows,
tables, the report page, its CSV and figure."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from image_classification.reporting import fashion_mnist_study as report


def _fake_results() -> list:
    results = []
    for op, accs in (("static", (88.0, 90.0)), ("pedconv", (89.0, 91.0, 92.0))):
        for seed, acc in enumerate(accs):
            results.append(report.RunResult(op=op, seed=seed, top1=acc, best_top1=acc + 0.5, train_ips=200.0 - seed,
                                           epoch_top1={0: acc - 5, 1: acc},
                                           loss_curve=[(0.5, 2.0), (1.0, 1.0), (1.5, 0.5), (2.0, 0.4)],
                                           seconds=60.0))
    return results


def test_summary_rows_and_table() -> None:
    profiles = {"static": report.OpProfile("static", 272_474, 31_000_000, 1.0, 1.0, 1.0),
                "pedconv": report.OpProfile("pedconv", 280_000, 31_500_000, 1.2, 1.2, 1.9)}
    rows = report.summarize_ops(_fake_results(), profiles, ["static", "pedconv", "dcd"])
    assert [r.op for r in rows] == ["static", "pedconv"]  # ops without runs are left out
    static, ped = rows
    assert static.top1_mean == pytest.approx(89.0) and static.top1_std == pytest.approx(1.41421356)
    assert ped.n == 3 and ped.top1_mean == pytest.approx(90.666666) and ped.top1_std == pytest.approx(1.527525)
    table = report.results_table(rows)
    assert "| PEDConv | `pedconv` | 90.67 ± 1.53 | 3 | 0.280M | 31.5M | 199 | 1.20 | 1.20 | 1.90 |" in table
    single = report.summarize_ops(_fake_results()[:1], profiles, ["static"])
    assert single[0].top1_std is None and "| 88.00 | 1 |" in report.results_table(single)


def test_write_report(tmp_path: Path) -> None:
    profiles = {"static": report.OpProfile("static", 272_474, 31_000_000),
                "pedconv": report.OpProfile("pedconv", 280_000, 31_500_000)}
    rows = report.write_report(_fake_results(), profiles, ["static", "pedconv"], tmp_path, "fm",
                               "python x.py --epochs 2", "2 epoch(s)", "test machine", total_seconds=600.0)
    assert len(rows) == 2
    text = (tmp_path / "fm.md").read_text()
    assert "`python x.py --epochs 2`" in text and "![learning curves](fm.png)" in text
    assert "Highest mean test top-1: PEDConv (90.67%); static conv: 89.00%." in text
    assert "| static conv | `static` | 89.00 ± 1.41 | 2 |" in text and "| - | - | - |" in text
    assert (tmp_path / "fm.png").stat().st_size > 10_000
    assert (tmp_path / "fm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows_csv = list(csv.DictReader((tmp_path / "fm.csv").open()))
    assert [r["operator"] for r in rows_csv] == ["static", "pedconv"] and rows_csv[0]["latency_ratio"] == ""


def test_write_report_without_finished_runs_raises_value_error(tmp_path: Path) -> None:
    """A library error (ValueError, one line), not a SystemExit from inside the package; nothing is written."""
    profiles = {"dcd": report.OpProfile("dcd", 300_000, 32_000_000)}
    with pytest.raises(ValueError, match="^no finished runs to report$"):
        report.write_report(_fake_results(), profiles, ["dcd"], tmp_path / "out", "fm", "cmd", "1 epoch", "machine")
    assert not (tmp_path / "out").exists()
