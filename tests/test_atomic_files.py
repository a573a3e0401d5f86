"""image_classification.atomic_files: whole files only, with the umask's permissions (not mkstemp's 0600)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import pytest

from image_classification.atomic_files import replaced_atomically, write_json_atomic


@pytest.fixture
def umask_027() -> Iterator[None]:
    previous = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_results_get_the_umask_mode_and_a_failed_write_leaves_the_old_file(umask_027: None, tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    write_json_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and _mode(target) == 0o640
    with pytest.raises(RuntimeError), replaced_atomically(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"a": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_the_path_cache_and_analysis_outputs_follow_the_umask(umask_027: None, tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from image_classification.analysis.common import save_figure, write_csv
    from image_classification.dynamic import autotune

    autotune.CACHE.clear()
    autotune.CACHE.put(("k",), autotune.TuneResult("a", {"a": 1.0, "b": 2.0}))
    try:
        assert autotune.save_cache_file(tmp_path / "pedconv_paths.json", torch.device("cpu")) == 1
    finally:
        autotune.CACHE.clear()
    write_csv(str(tmp_path / "rows.csv"), [{"x": 1.0}])
    save_figure(plt.figure(), str(tmp_path / "fig.png"))
    for name in ("pedconv_paths.json", "rows.csv", "fig.png"):
        assert _mode(tmp_path / name) == 0o640, name
