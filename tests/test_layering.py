"""The package's layering: programs above the library, no import circle, the contracts of pyproject.toml."""

from __future__ import annotations

import ast
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


def test_the_package_root_holds_foundations_only() -> None:
    """Every module at the package root (compat, timing, argparsing, ...) imports no sub-package, so the root sits
    below every folder and no folder-level circle can pass through it; no folder-level circle exists at all."""
    graph = _import_graph()
    arrows = graph.module_arrows()
    package = ROOT / "image_classification"
    folders = {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}

    def folder(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in folders) else "(root)"

    root_modules = [m for m in arrows if folder(m) == "(root)"]
    assert "image_classification.compat" in root_modules
    upward = sorted((a, b) for a in root_modules for b in arrows[a] if folder(b) != "(root)")
    assert upward == []
    folder_arrows: dict = {}
    for a, targets in arrows.items():
        for b in targets:
            if folder(a) != folder(b):
                folder_arrows.setdefault(folder(a), set()).add(folder(b))
    nodes = sorted(set(folder_arrows) | {b for bs in folder_arrows.values() for b in bs})
    assert graph.circles(nodes, {n: folder_arrows.get(n, set()) for n in nodes}) == []


def test_import_linter_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def _imported_modules(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_tools_holds_programs_that_only_programs_and_their_tests_import() -> None:
    """Every module of tools/ is a program (a ``main``; synthetic_cli is the shared command line of the two
    synthetic-set programs), and what the scripts and the top-level programs share with them lives in the
    library: scripts/ import no tools module, main.py/multiproc.py import none, classify.py only its program."""
    tools = ROOT / "image_classification" / "tools"
    not_programs = [p.name for p in sorted(tools.glob("*.py"))
                    if p.name not in ("__init__.py", "synthetic_cli.py") and "def main(" not in p.read_text()]
    assert not_programs == []
    offenders = {}
    for path in [*sorted((ROOT / "scripts").rglob("*.py")), ROOT / "main.py", ROOT / "multiproc.py"]:
        found = sorted(name for name in _imported_modules(path) if name.startswith("image_classification.tools"))
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert offenders == {}
    assert {name for name in _imported_modules(ROOT / "classify.py") if ".tools" in name} <= {
        "image_classification.tools.classify", "image_classification.tools.classify.main"}


def test_no_type_only_imports_hide_a_circle() -> None:
    """Imports under ``if TYPE_CHECKING:`` are invisible to the circle check above; the package has none, so the
    import graph it checks is the whole graph (the operators' paths type against ``pedconv.common.PEDConvLayer``,
    the protocol against ``dynamic.spec``, instead of importing back up)."""
    hidden = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "image_classification").rglob("*.py"))
              if "if TYPE_CHECKING" in path.read_text()]
    assert hidden == []


def test_pre_commit_runs_the_source_checks_of_ci_and_the_type_check_exempts_nothing() -> None:
    """The pre-commit hooks call the tools CI calls (ruff, mypy, lint-imports); mypy checks every module of the
    package (no override switches a project module's errors off) and flags a stale ``type: ignore``; every
    ``type: ignore`` names the error code it silences (a bare one would hide any error on its line) and, after it
    on the same line, why (``# type: ignore[code]  # reason``)."""
    import re

    import tomllib
    import yaml

    hooks = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())["repos"][0]["hooks"]
    assert {hook["entry"].split()[0] for hook in hooks} == {"ruff", "mypy", "lint-imports"}
    assert "mypy" in (ROOT / "scripts" / "run_tests.sh").read_text()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert config["files"] == ["image_classification"] and config["warn_unused_ignores"] is True
    relaxed = [name for override in config.get("overrides", []) for name in override["module"]
               if name.startswith("image_classification") or override.get("ignore_errors")]
    assert relaxed == []
    unexplained = [f"{path.relative_to(ROOT)}:{number}"
                   for path in sorted((ROOT / "image_classification").rglob("*.py"))
                   for number, line in enumerate(path.read_text().splitlines(), 1)
                   if "type: ignore" in line and not re.search(r"type: ignore\[[-a-z, ]+\]  # \S", line)]
    assert unexplained == []


def test_functions_and_modules_stay_readable() -> None:
    """No function over 90 lines (the Triton kernels excepted: a kernel is one launch) and no module over 700 lines
    in the package: a longer one is several ideas, to be split where the seams are."""
    long_functions, long_modules = [], []
    for path in sorted((ROOT / "image_classification").rglob("*.py")):
        source = path.read_text()
        if len(source.splitlines()) > 700:
            long_modules.append(f"{path.relative_to(ROOT)} ({len(source.splitlines())} lines)")
        if path.name == "triton_kernels.py":
            continue
        for node in ast.walk(ast.parse(source, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                if length > 90:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert long_functions == [] and long_modules == []
