"""python -m image_classification.tools.raport_to_tensorboard: a raport's scalars as event files, at the steps
main.py --tensorboard uses; bad input is one line and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from image_classification.reporting.tensorboard import iterations_per_epoch, scalar_entries
from image_classification.tools.raport_to_tensorboard import main
from image_classification.training.logger import RaportWriter

pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def write_raport(path: Path) -> None:
    """Two epochs of 4 iterations, logged every 3 (3, 4) as main.py logs them, with validation and a summary."""
    raport = RaportWriter(str(path))
    raport.log_parameters({"arch": "cifar_resnet20", "lr": 0.1})
    for epoch in range(2):
        for it in (3, 4):
            raport.log((epoch, it), {"train.loss": 2.0 - epoch - it / 10, "train.lr": 0.1, "train.top1": 10.0 * it})
        raport.log((epoch,), {"train.loss": 1.5 - epoch, "val.loss": 1.8 - epoch, "val.top1": 40.0 + epoch})
    raport.log((), {"summary.best_top1": 41.0, "summary.epochs": 2})
    raport.close()


def scalars(logdir: Path) -> dict:
    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: {e.step: round(e.value, 6) for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}


def test_mapping_and_epoch_length() -> None:
    assert scalar_entries((1, 3), {"train.loss": 0.5, "note": "x", "bad": float("nan")}, per_epoch=4) == [
        ("train/loss", 0.5, 7)]
    assert scalar_entries((2,), {"val.top1": 40}, per_epoch=4) == [("epoch/val.top1", 40.0, 2)]
    assert scalar_entries("PARAMETER", {"lr": 0.1}, 4) == [] and scalar_entries([], {"summary.epochs": 2}, 4) == []
    assert iterations_per_epoch([{"type": "LOG", "step": [0, 3]}, {"type": "LOG", "step": [1, 4]}]) == 4


def test_converts_every_scalar_at_main_pys_steps(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "run_a").mkdir()
    write_raport(tmp_path / "run_a" / "raport.json")
    assert main([str(tmp_path / "run_a" / "raport.json"), "--out", str(tmp_path / "tb")]) == 0
    assert "-> " in capsys.readouterr().out
    got = scalars(tmp_path / "tb" / "run_a")
    assert got["train/loss"] == {3: 1.7, 4: 1.6, 7: 0.7, 8: 0.6}  # epoch * 4 + iteration
    assert got["train/top1"] == {3: 30.0, 4: 40.0, 7: 30.0, 8: 40.0}
    assert got["epoch/val.top1"] == {0: 40.0, 1: 41.0} and got["epoch/train.loss"] == {0: 1.5, 1: 0.5}
    assert not any(tag.startswith("summary") for tag in got)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "tb")])
    assert info.value.code == 2 and "no such raport file" in capsys.readouterr().err
    assert not (tmp_path / "tb").exists()
    (tmp_path / "r").mkdir()
    write_raport(tmp_path / "r" / "raport.json")
    assert main([str(tmp_path / "r" / "raport.json"), "--out", str(tmp_path / "tb")]) == 0
    before = sorted(p.name for p in (tmp_path / "tb" / "r").iterdir())
    with pytest.raises(SystemExit):  # converting again would show every curve twice
        main([str(tmp_path / "r" / "raport.json"), "--out", str(tmp_path / "tb")])
    assert "already holds TensorBoard event files" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "tb" / "r").iterdir()) == before


def test_empty_and_malformed_raports_are_refused_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An empty raport or a JSON file that is no raport converted 0 records with exit 0; a bad step was
    'invalid literal for int()' without the record."""
    (tmp_path / "good").mkdir()
    write_raport(tmp_path / "good" / "raport.json")
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "other.json").write_text('{"not": "a raport"}\n')
    (tmp_path / "bad.json").write_text('DLLL {"type": "LOG", "step": [0, "x"], "data": {"train.loss": 1}}\n')
    for name, message in [("empty.json", "no LOG records"), ("other.json", "no LOG records"),
                          ("bad.json", "DLLL record 1 has step [0, 'x']")]:
        code = main([str(tmp_path / "good" / "raport.json"), str(tmp_path / name), "--out", str(tmp_path / "tb")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "tb").exists()  # the good raport before it was not converted either


def test_default_names_tell_the_studys_runs_apart(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The Fashion-MNIST study's static/seed0/raport.json and pedconv/seed0/raport.json were refused ('would share one
    folder (seed0, seed0); give --names')."""
    paths = []
    for op in ("static", "pedconv"):
        (tmp_path / op / "seed0").mkdir(parents=True)
        write_raport(tmp_path / op / "seed0" / "raport.json")
        paths.append(str(tmp_path / op / "seed0" / "raport.json"))
    assert main([*paths, "--out", str(tmp_path / "tb")]) == 0
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["pedconv-seed0", "static-seed0"]
