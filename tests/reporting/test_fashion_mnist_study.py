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
    assert "| PEDConv | `pedconv` | 90.67 ± 1.53 | 3 | 0.280M | 1.03 | 31.5M | 199 | 1.20 | 1.20 | 1.90 |" in table
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


def test_console_summary_says_what_pedconv_is_for_and_what_the_run_cannot_say() -> None:
    profiles = {"static": report.OpProfile("static", 272_474, 31_000_000, 1.0, 1.0, 1.0),
                "pedconv": report.OpProfile("pedconv", 283_000, 31_500_000, 1.2, 2.4, 2.3),
                "dyconv": report.OpProfile("dyconv:k=4", 1_090_000, 32_000_000, 1.1, 1.9, 1.7)}
    results = _fake_results() + [report.RunResult("dyconv", 0, 87.0, 87.0, 300.0)]
    rows = report.summarize_ops(results, profiles, ["static", "pedconv", "dyconv"])
    costs = [report.ImageNetCost("resnet18", 1.13, 1.14, 16)]
    text = report.console_summary(rows, costs, "2 epoch(s) on 6000 images")
    assert "PEDConv                  parameters x1.04 (+4% vs static); batch-1 latency x2.40, train step x2.30" in text
    assert "DY-Conv (K=4)            parameters x4.00 (+300% vs static)" in text
    assert "ResNet-18    batch-1 latency x1.13 (paper, CPU: x1.07), train step x1.14 (batch 16)" in text
    assert "says nothing about the ImageNet accuracy claims" in text and "2 epoch(s) on 6000 images" in text
    assert "(one seed" not in text  # static and PEDConv have several seeds here
    one = report.summarize_ops([r for r in results if r.seed == 0], profiles, ["static", "pedconv"])
    assert "(one seed: no spread is known)" in report.console_summary(one, [], "x")
    table = report.cost_table(costs)
    assert "| ResNet-18 | 1.13 | 1.07 | 1.14 (batch 16) |" in table


def test_one_seed_report_draws_no_error_bars_and_bars_from_zero(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.axes

    seen = {}
    real_bar = matplotlib.axes.Axes.bar

    def spy(self, x, height, *args, **kwargs):
        seen["yerr"] = kwargs.get("yerr")
        container = real_bar(self, x, height, *args, **kwargs)
        seen["axes"] = self
        return container

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", spy)
    profiles = {"static": report.OpProfile("static", 272_474, 31_000_000),
                "pedconv": report.OpProfile("pedconv", 280_000, 31_500_000)}
    one_seed = [r for r in _fake_results() if r.seed == 0]
    report.write_report(one_seed, profiles, ["static", "pedconv"], tmp_path, "fm", "cmd", "1 epoch", "machine",
                        costs=[report.ImageNetCost("resnet18", 1.1, 1.2, 16)])
    assert seen["yerr"] is None and seen["axes"].get_ylim() == (0.0, 100.0)
    assert "no spread" in seen["axes"].get_title()
    text = (tmp_path / "fm.md").read_text()
    assert "## Cost where the paper claims it" in text and "| ResNet-18 | 1.10 | 1.07 | 1.20 (batch 16) |" in text
