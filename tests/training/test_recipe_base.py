"""Recipes that inherit: ``base:`` in a ``--config`` file (main.py and the dense scripts share one loader)."""

from __future__ import annotations

from pathlib import Path

import pytest

from image_classification.tools import train_segmentation as seg_train
from image_classification.training.cli import parse_args
from image_classification.training.config import read_recipe_chain


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _one_line_error(capsys: pytest.CaptureFixture, argv: list) -> str:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1].startswith("main.py: error: ") and "Traceback" not in "".join(lines)
    return lines[-1]


@pytest.fixture
def common(tmp_path: Path) -> list:
    return ["--data-backend", "synthetic", "--workspace", str(tmp_path / "ws")]


def test_chain_overrides_in_order(tmp_path: Path, common: list) -> None:
    """Grand-base < base < recipe < command line; ``base:`` is relative to the file that names it."""
    _write(tmp_path / "shared" / "root.yaml", "arch: resnet18\nlr: 0.1\nepochs: 90\nwd: 0.0001\nlr-steps: [30, 60]\n")
    _write(tmp_path / "table" / "_base.yaml", "base: ../shared/root.yaml\nlr: 0.2\nlabel_smoothing: 0.1\n")
    recipe = _write(tmp_path / "table" / "run.yaml", "base: _base.yaml\nlr: 0.3\nweight-decay: 0.0005\n")
    args = parse_args(["--config", str(recipe), *common])
    assert ((args.arch, args.lr, args.epochs, args.label_smoothing, args.lr_steps)
            == ("resnet18", 0.3, 90, 0.1, [30, 60]))
    assert args.weight_decay == 0.0005  # an alias of the base's key (--wd) overrides it too
    args = parse_args(["--config", str(recipe), "--lr", "0.4", "--epochs", "2", *common])
    assert (args.lr, args.epochs) == (0.4, 2)
    chain = read_recipe_chain(str(recipe), pytest.fail)
    assert [Path(f.path).name for f in chain] == ["root.yaml", "_base.yaml", "run.yaml"]
    assert all("base" not in f.values for f in chain)


def test_recipe_switches_off_what_its_base_switched_on(tmp_path: Path, common: list) -> None:
    _write(tmp_path / "_base.yaml", "amp: true\nbn-weight-decay: true\n")
    recipe = _write(tmp_path / "run.yaml", "base: _base.yaml\namp: false\n")
    args = parse_args(["--config", str(recipe), *common])
    assert args.amp is False and args.bn_weight_decay is True


def test_cycle_is_refused_naming_the_files(capsys: pytest.CaptureFixture, tmp_path: Path, common: list) -> None:
    a = _write(tmp_path / "a.yaml", "base: b.yaml\nlr: 0.1\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    err = _one_line_error(capsys, ["--config", str(a), *common])
    assert "cycle" in err and f"{tmp_path}/a.yaml -> {tmp_path}/b.yaml -> {tmp_path}/a.yaml" in err
    itself = _write(tmp_path / "self.yaml", "base: ./self.yaml\n")
    assert "cycle" in _one_line_error(capsys, ["--config", str(itself), *common])


def test_missing_or_bad_base_named(capsys: pytest.CaptureFixture, tmp_path: Path, common: list) -> None:
    recipe = _write(tmp_path / "run.yaml", "base: nowhere/_base.yaml\nlr: 0.1\n")
    err = _one_line_error(capsys, ["--config", str(recipe), *common])
    assert f"base recipe {tmp_path}/nowhere/_base.yaml (named by {recipe})" in err and "No such file" in err
    _write(recipe, "base: [a.yaml]\n")
    assert f"'base' in {recipe} must be the file name of a recipe" in _one_line_error(
        capsys, ["--config", str(recipe), *common])
    _write(tmp_path / "_base.yaml", "learning-rate: 0.1\n")
    _write(recipe, "base: _base.yaml\n")
    assert f"unknown key(s) in --config {tmp_path}/_base.yaml: learning-rate" in _one_line_error(
        capsys, ["--config", str(recipe), *common])
    _write(tmp_path / "_base.yaml", "lr: 0.1\nepochs: 3\nlr: 0.2\n")  # safe_load would keep 0.2 silently
    assert "key 'lr' appears twice (lines 1 and 3); keep one" in _one_line_error(
        capsys, ["--config", str(recipe), *common])


def test_dense_scripts_resolve_base(tmp_path: Path) -> None:
    _write(tmp_path / "_base.yaml", "arch: upernet\nlr: 0.02\niterations: 100\nscales: [300, 400]\n")
    recipe = _write(tmp_path / "run.yaml", "base: _base.yaml\niterations: 50\n")
    args = seg_train.parse_args(["/data", "--config", str(recipe)])
    assert (args.arch, args.lr, args.iterations, args.scales) == ("upernet", 0.02, 50, [300, 400])
    args = seg_train.parse_args(["/data", "--config", str(recipe), "--lr", "0.01"])
    assert args.lr == 0.01
