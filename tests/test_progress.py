"""image_classification.progress: what the long measurements print while they run."""

from __future__ import annotations

import pytest

from image_classification.progress import progress


def test_plain_lines_when_stderr_is_no_terminal(capsys: pytest.CaptureFixture) -> None:
    assert list(progress(range(3), "counting rows", unit="row", every_s=0.0, use_tqdm=False)) == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "counting rows: 3 row(s) ..."
    assert [line.split(" after ")[0] for line in lines[1:4]] == [f"counting rows: {i}/3 row(s)" for i in (1, 2, 3)]
    assert lines[4].startswith("counting rows: done (3 row(s), ") and len(lines) == 5


def test_an_iterator_without_length_and_a_bar_on_a_terminal(capsys: pytest.CaptureFixture) -> None:
    assert list(progress(iter("ab"), "reading", use_tqdm=False)) == ["a", "b"]
    assert capsys.readouterr().err.splitlines()[0] == "reading: some step(s) ..."
    assert list(progress([1, 2], "timing", use_tqdm=True)) == [1, 2]
    assert "timing" in capsys.readouterr().err  # tqdm's bar
