"""The one raport reader (reporting/raport.py) and the writer's repair of a torn last record."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from image_classification.reporting.raport import read_raport
from image_classification.training import logger as training_logger
from image_classification.training.logger import RaportWriter


def _raport(path: Path) -> Path:
    writer = RaportWriter(str(path))
    writer.log_parameters({"epochs": 2})
    writer.log((0, 5), {"train.loss": 1.0})
    writer.log((0,), {"val.top1": 50.0})
    writer.close()
    return path


def test_every_reader_is_the_same_function() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import collect_results

    assert training_logger.read_raport is read_raport and collect_results.read_raport is read_raport


@pytest.mark.parametrize("tail", ['DLLL {"type": "LOG", "step": [1, 5], "da', "DLLL ", 'DLLL {"type": "LOG"}}'])
def test_truncated_last_line_is_skipped(tmp_path: Path, tail: str) -> None:
    path = _raport(tmp_path / "raport.json")
    complete = read_raport(path)
    with open(path, "a") as handle:
        handle.write(tail)  # a run killed mid-write (no newline), or a garbled last line
    assert read_raport(path) == complete
    path.write_text(path.read_text() + "\n")  # the same torn line, newline-terminated: still the last line
    assert read_raport(path) == complete


def test_malformed_line_before_the_last_is_an_error(tmp_path: Path) -> None:
    path = _raport(tmp_path / "raport.json")
    lines = path.read_text().splitlines()
    lines.insert(1, 'DLLL {"broken"')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"raport\.json:2: malformed DLLL record"):
        read_raport(path)


def test_resumed_writer_removes_a_torn_record_before_appending(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    path = _raport(tmp_path / "raport.json")
    before = read_raport(path)
    with open(path, "a") as handle:
        handle.write('DLLL {"type": "LOG", "step": [1, 3], "data": {"train.lo')
    with caplog.at_level(logging.WARNING, logger="image_classification.training.logger"):
        writer = RaportWriter(str(path), append=True)
    writer.log((1,), {"val.top1": 60.0})
    writer.close()
    assert "removed a partial last record" in caplog.text
    records = read_raport(path)  # would fail if the new record had been glued onto the torn line
    assert records[:-1] == before and records[-1]["data"] == {"val.top1": 60.0}
    assert path.read_text().endswith("}\n")


def test_resumed_writer_keeps_a_whole_raport_and_a_file_of_one_torn_line(tmp_path: Path) -> None:
    path = _raport(tmp_path / "raport.json")
    text = path.read_text()
    RaportWriter(str(path), append=True).close()
    assert path.read_text() == text  # nothing cut from a raport that ends with a newline
    torn = tmp_path / "torn.json"
    torn.write_text('DLLL {"type": "LO')
    RaportWriter(str(torn), append=True).close()
    assert torn.read_text() == ""
