"""``pip install .`` works: pyproject.toml's [build-system] builds a wheel that holds every package."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from image_classification.compat import MIN_TORCH

MIN = ".".join(map(str, MIN_TORCH))  # the wheel's requirement is the range compat checks at import
ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_every_package(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # a copy: setuptools writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT / "image_classification", source / "image_classification",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q",
         "-w", str(tmp_path / "wheel"), str(source)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("pedconv_image_classification-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(str(p.parent.relative_to(ROOT)) for p in (ROOT / "image_classification").rglob("__init__.py"))
    assert packages and all(f"{package}/__init__.py" in names for package in packages)
    assert not any(name.startswith(("tests/", "scripts/", "configs/")) for name in names)
    metadata = next(name for name in names if name.endswith(".dist-info/METADATA"))
    assert f"Requires-Dist: torch>={MIN}" in zipfile.ZipFile(wheel).read(metadata).decode()
