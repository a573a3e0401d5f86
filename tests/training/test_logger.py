"""The raport is byte-format compatible with dllogger's JSONStreamBackend and reads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from image_classification.training.logger import METRICS, Progress, RaportWriter, raport_values, read_raport


def test_records_match_dllogger_json_stream_format(tmp_path: Path) -> None:
    path = tmp_path / "raport.json"
    writer = RaportWriter(str(path))
    writer.log_parameters({"lr": 0.1, "arch": "resnet18"})
    writer.metadata("train.loss", {"unit": None, "format": ":>5.5f"})
    writer.log((0, 1), {"train.loss": 2.5})
    writer.log((), {"val.top1": 50.0})
    writer.close()
    lines = path.read_text().splitlines()
    assert all(line.startswith("DLLL {") for line in lines)
    records = [json.loads(line[5:]) for line in lines]
    assert list(records[0]) == ["timestamp", "datetime", "elapsedtime", "type", "step", "data"]
    assert records[0]["type"] == "LOG" and records[0]["step"] == "PARAMETER"
    assert list(records[1]) == ["timestamp", "elapsedtime", "datetime", "type", "metric", "metadata"]
    assert records[1]["type"] == "METADATA" and records[1]["metadata"] == {"unit": None, "format": ":>5.5f"}
    assert records[2]["step"] == [0, 1] and records[3]["step"] == []
    for record in records:  # dllogger writes these as strings
        float(record["timestamp"]), float(record["elapsedtime"])
        assert isinstance(record["datetime"], str)


def test_read_raport_skips_foreign_lines_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    writer = RaportWriter(str(path))
    writer.log((0, 1), {"train.loss": 1.0})
    writer.close()
    with open(path, "a") as handle:
        handle.write("some stray output\n")
    writer = RaportWriter(str(path), append=True)
    writer.log((1,), {"train.loss": 0.5, "val.top1": 10.0})
    writer.close()
    records = read_raport(path)
    assert len(records) == 2
    assert raport_values(records, "train.loss") == [([0, 1], 1.0), ([1], 0.5)]


def test_malformed_record_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text('DLLL {"type": "LOG"}\nDLLL {broken\nDLLL {"type": "LOG"}\n')
    with pytest.raises(ValueError, match=r"r\.json:2"):
        read_raport(path)


def test_disabled_writer_writes_nothing(tmp_path: Path) -> None:
    writer = RaportWriter(None)
    writer.log((0,), {"x": 1})
    writer.close()
    assert list(tmp_path.iterdir()) == []


def test_metadata_covers_issue_metrics() -> None:
    for name in ("train.loss", "train.infomax", "train.lr", "train.compute_ips", "train.total_ips",
                 "train.data_time", "val.top1", "val.top5", "val.loss", "val.compute_ips", "val.compute_latency",
                 "val_ema.top1"):
        assert name in METRICS


def test_plain_progress_lines(capsys: pytest.CaptureFixture) -> None:
    progress = Progress("Epoch 0 train", total=4, print_freq=2, use_tqdm=False)
    progress.update(2, {"train.loss": 1.25})
    progress.close({"train.loss": 1.0})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Epoch 0 train [2/4]  loss 1.25"
    assert out[1].startswith("Epoch 0 train done in") and "loss 1" in out[1]


def test_an_epoch_cut_short_is_not_reported_done(capsys: pytest.CaptureFixture) -> None:
    progress = Progress("Epoch 0 train", total=128, print_freq=10, use_tqdm=False)
    progress.update(50, {"train.loss": 1.25})
    progress.close({"train.loss": 1.0}, stopped_at=51)
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("Epoch 0 train stopped at [51/128] after") and "done" not in last


def test_disabled_progress_is_silent(capsys: pytest.CaptureFixture) -> None:
    progress = Progress("x", 1, 1, enabled=False)
    progress.update(1, {"a": 1.0})
    progress.close({"a": 1.0})
    assert capsys.readouterr().out == ""


def test_tqdm_progress_on_a_terminal(capsys: pytest.CaptureFixture) -> None:
    progress = Progress("Epoch 3 train", total=2, print_freq=1, use_tqdm=True)
    progress.update(1, {"train.loss": 0.5})
    progress.update(2, {"train.loss": 0.25})
    progress.close()
    captured = capsys.readouterr()
    assert "Epoch 3 train" in captured.err and "2/2" in captured.err and captured.out == ""


def test_between_metric_lines_the_pass_shows_it_moves(capsys: pytest.CaptureFixture) -> None:
    """tick(): on a terminal the bar counts every iteration; in a log a line appears when none came for quiet_s."""
    bar = Progress("Epoch 0 train", total=23, print_freq=10, use_tqdm=True)
    bar.tick(1)
    assert bar._bar.n == 1  # the bar moves every iteration, not only with a metrics line
    bar.close()
    capsys.readouterr()
    plain = Progress("Epoch 0 train", total=23, print_freq=10, use_tqdm=False, quiet_s=3600)
    plain.tick(1)
    assert capsys.readouterr().out == ""  # not quiet for long enough yet
    plain.quiet_s = 0.0
    plain.tick(2)
    assert capsys.readouterr().out.startswith("Epoch 0 train [2/23]  (0 s; metrics every 10 iterations)")


def test_a_raport_the_disk_cannot_take_is_one_error_naming_it(tmp_path, monkeypatch) -> None:
    """A full disk while writing a record: RaportError naming the file, the errno's words and the free space;
    nothing more is written to it (main.py turns this into one line and exit 2)."""
    import errno

    from image_classification.training.logger import RaportError

    path = tmp_path / "raport.json"
    writer = RaportWriter(str(path))
    writer.log((0, 1), {"train.loss": 1.0})

    class FullFile:
        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            pass

    writer._file = FullFile()
    with pytest.raises(RaportError, match=rf"cannot write the raport {path}: No space left on device \(.* MiB free\)"):
        writer.log((0, 2), {"train.loss": 0.5})
    writer.log((0, 3), {"train.loss": 0.25})  # the file is dropped: no second error, no write
    writer.close()
    assert [r["step"] for r in read_raport(path)] == [[0, 1]]
