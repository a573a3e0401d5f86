"""main.py --tensorboard: the raport's scalars as TensorBoard event files on rank 0, the same numbers at the same
steps, continued by a resumed run; a missing tensorboard package is a one-line error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from image_classification.reporting import read_raport

pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ARGS = ["--data-backend", "synthetic", "--arch", "cifar_resnet20", "--image-size", "16", "--num-classes", "3",
        "-b", "4", "-j", "0", "--seed", "1", "-p", "2", "--prof", "5", "--no-autotune", "--epochs", "3"]


def read_events(logdir: Path) -> dict:
    """tag -> {step: value} of every scalar in the event files under ``logdir`` (all runs' files merged)."""
    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}


def expected_from_raport(raport: Path, per_epoch: int) -> dict:
    expected: dict = {}
    for record in read_raport(raport):
        step, data = record.get("step"), record.get("data", {})
        if record.get("type") != "LOG" or not isinstance(step, list) or len(step) not in (1, 2):
            continue
        for name, value in data.items():
            if len(step) == 2:
                expected.setdefault(name.replace(".", "/", 1), {})[step[0] * per_epoch + step[1]] = value
            else:
                expected.setdefault(f"epoch/{name}", {})[step[0]] = value
    return expected


@pytest.mark.slow
def test_event_files_hold_the_raports_numbers_and_a_resumed_run_continues_them(e2e, tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    first = e2e.run([*ARGS, "--run-epochs", "2", "--workspace", str(workspace), "--tensorboard", "tb"])
    assert first.returncode == 0, first.stderr[-2000:]
    second = e2e.run([*ARGS, "--resume", "auto", "--workspace", str(workspace), "--tensorboard", "tb"])
    assert second.returncode == 0, second.stderr[-2000:]
    events = read_events(workspace / "tb")
    expected = expected_from_raport(workspace / "raport.json", per_epoch=5)
    assert {"train/loss", "train/lr", "train/top1", "train/total_ips", "train/infomax", "epoch/train.loss",
            "epoch/val.loss", "epoch/val.top1", "epoch/val.top5"} <= set(events)
    assert set(events) == set(expected)
    for tag, values in expected.items():
        assert set(events[tag]) == set(values), tag
        for step, value in values.items():
            assert events[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-6), (tag, step)
    assert sorted(events["epoch/val.top1"]) == [0, 1, 2]  # epochs 0-1 from the first run, 2 from the resumed one
    assert sorted(events["train/loss"]) == [2, 4, 5, 7, 9, 10, 12, 14, 15]  # one axis across the two runs


def test_missing_tensorboard_is_one_line(e2e, tmp_path: Path) -> None:
    """A tensorboard module that fails to import stands in for a machine without the package (a fresh interpreter:
    the e2e runner's forks have their imports done already)."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "tensorboard.py").write_text("raise ImportError('No module named tensorboard')\n")
    env = dict(os.environ, PYTHONPATH=f"{hide}{os.pathsep}{e2e.repo}")
    res = subprocess.run([sys.executable, e2e.main, *ARGS, "--workspace", str(tmp_path / "ws"), "--tensorboard"],
                         env=env, cwd=e2e.repo, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert not (tmp_path / "ws").exists()  # refused before anything is written
    last = res.stderr.strip().splitlines()[-1]
    assert "--tensorboard needs the optional package tensorboard: pip install tensorboard" in last


def test_unusable_tensorboard_folders_are_one_line_before_anything_is_written(e2e, tmp_path: Path) -> None:
    """/proc/tbdir was a 35-line FileNotFoundError that left an empty raport.json; FILE/sub a NotADirectoryError."""
    a_file = tmp_path / "tbfile"
    a_file.write_text("not a folder")
    for folder, message in [(f"{a_file}/sub", f"cannot create {a_file}/sub ({a_file}: not a directory)"),
                            ("/proc/tbdir", "cannot create /proc/tbdir (/proc: ")]:
        res = e2e.run([*ARGS, "--workspace", str(tmp_path / "ws"), "--tensorboard", folder])
        assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
        assert res.stderr.strip().count("\n") == 0 and not (tmp_path / "ws").exists()


def test_a_second_run_does_not_mix_into_another_runs_folder(e2e, tmp_path: Path) -> None:
    """Two runs with their own workspaces and one --tensorboard DIR gave one curve with steps [1, 1, 2, 2]; the second
    is refused (naming the first run's raport) unless --overwrite, which replaces the first run's event files."""
    shared = tmp_path / "tb"
    short = [*ARGS[:-1], "1"]  # one epoch
    first = e2e.run([*short, "--workspace", str(tmp_path / "a"), "--tensorboard", str(shared)])
    assert first.returncode == 0, first.stderr[-2000:]
    before = sorted(p.name for p in shared.iterdir())
    second = e2e.run([*short, "--workspace", str(tmp_path / "b"), "--tensorboard", str(shared)])
    assert second.returncode == 2 and not (tmp_path / "b").exists()
    assert (f"{shared} holds the TensorBoard event files of the run of {tmp_path / 'a' / 'raport.json'}; choose "
            "another folder (e.g. one per run), or pass --overwrite") in second.stderr
    assert sorted(p.name for p in shared.iterdir()) == before
    third = e2e.run([*short, "--workspace", str(tmp_path / "b"), "--tensorboard", str(shared), "--overwrite"])
    assert third.returncode == 0, third.stderr[-2000:]
    assert (shared / ".pedconv-run").read_text().strip() == str(tmp_path / "b" / "raport.json")
    assert sorted(read_events(shared)["train/loss"]) == [2, 4, 5]  # the second run's steps, once each
