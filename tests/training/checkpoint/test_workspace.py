"""The one writability check (training/checkpoint/workspace.py) and the checkpoint package's facade."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from image_classification.training import checkpoint
from image_classification.training.checkpoint.workspace import (
    check_workspace_writable,
    directory_write_problem,
    nearest_existing_directory,
)


def test_writable_directory_has_no_problem_and_keeps_nothing(tmp_path: Path) -> None:
    assert directory_write_problem(tmp_path) is None
    assert list(tmp_path.iterdir()) == []  # the probe file is removed


def test_a_file_is_not_a_writable_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert directory_write_problem(tmp_path / "f") == "not a directory"
    assert directory_write_problem(tmp_path / "missing") == "not a directory"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert "denied" in directory_write_problem(locked).lower()
        with pytest.raises(checkpoint.CheckpointError, match="is not writable: Permission denied"):
            check_workspace_writable(locked / "ws")
    finally:
        locked.chmod(0o700)


def test_nearest_existing_directory(tmp_path: Path) -> None:
    assert nearest_existing_directory(tmp_path / "a" / "b") == tmp_path
    assert nearest_existing_directory(tmp_path) == tmp_path


def test_checkpoint_package_reexports_every_public_name() -> None:
    """Callers import checkpoint names from the package; each is the object one of its modules defines."""
    from image_classification.training.checkpoint import errors, load, random_state, save, shutdown, weights, workspace

    homes = (load, save, errors, random_state, shutdown, weights, workspace)
    for name in checkpoint.__all__:
        owners = [module for module in homes if getattr(module, name, None) is getattr(checkpoint, name)]
        assert owners, name


def test_checkpoint_package_is_used_through_its_facade() -> None:
    """No library module outside training/checkpoint/ imports one of its modules, and no module inside it
    imports another's private name."""
    import ast

    root = Path(__file__).resolve().parents[3] / "image_classification"
    package = root / "training" / "checkpoint"
    offences = []
    for path in root.rglob("*.py"):
        inside = package in path.parents
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            module = node.module or ""
            if not inside and "checkpoint." in module and "training" in (module + str(path)):
                offences.append(f"{path.relative_to(root)} imports {module}")
            if inside and node.level and any(alias.name.startswith("_") for alias in node.names):
                offences.append(f"{path.relative_to(root)} imports private names of .{module}")
    assert not offences, offences


def test_refused_probe_is_reported_by_main_argument_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root passes os.access everywhere; the probe is what decides (here the file system refuses it)."""
    import tempfile

    from image_classification.training.cli import parse_args

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert directory_write_problem(tmp_path) == "Permission denied"
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--data-backend", "synthetic", "--workspace", str(tmp_path / "ws")])
    assert exit_info.value.code == 2


def test_unreachable_peer_store_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A peer monitor that cannot reach its store disables itself with a warning, never silently."""
    import logging

    from image_classification.training.rank_health import PeerMonitor

    monitor = PeerMonitor(rank=0, world_size=2, host="127.0.0.1", port=1)

    def unreachable() -> None:
        raise RuntimeError("connection refused")

    monitor._connect = unreachable
    with caplog.at_level(logging.WARNING, logger="image_classification.training.rank_health"):
        assert monitor.start() is monitor
    assert "peer monitor disabled" in caplog.text and "connection refused" in caplog.text
