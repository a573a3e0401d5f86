"""The package's layering: programs above the library, no import circle, the contracts of pyproject.toml."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_library_module_imports_a_program_and_no_import_circle() -> None:
    graph = _import_graph()
    arrows = graph.module_arrows()
    programs = graph.programs(sorted(arrows))
    assert programs and all(".tools" in name for name in programs), sorted(programs)  # every program in tools/
    upward = [(a, b) for a in arrows if a not in programs for b in arrows[a] if b in programs]
    assert not upward, upward
    assert graph.circles(sorted(arrows), arrows) == []


def test_import_linter_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
