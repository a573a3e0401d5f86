"""Count the import graph of the image_classification package with grimp.

Prints modules, module-level import arrows, package-level arrows ("rooms": one per folder), the arrows
from library modules into programs (modules with a ``__main__`` block or under ``tools/``), and every
import circle (strongly connected component) among modules; imports under ``if TYPE_CHECKING:`` are left
out, as they never run.

Usage: python scripts/import_graph.py    (grimp comes with requirements-dev.txt's import-linter)
"""
from __future__ import annotations

import pathlib
import sys

import grimp

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "image_classification"


def programs(modules: list[str]) -> set[str]:
    found = set()
    for name in modules:
        path = ROOT / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = ROOT / name.replace(".", "/") / "__init__.py"
        text = path.read_text() if path.exists() else ""
        if ".tools." in name + "." or '__name__ == "__main__"' in text:
            found.add(name)
    return found


def circles(nodes: list[str], arrows: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in arrows.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in nodes:
        if v not in index:
            visit(v)
    return found


def module_arrows() -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (imports under ``if TYPE_CHECKING:`` left out)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    graph = grimp.build_graph(PACKAGE, exclude_type_checking_imports=True)
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}


def main() -> int:
    arrows = module_arrows()
    modules = sorted(arrows)
    package_of = {m: (m if (ROOT / m.replace(".", "/")).is_dir() else m.rpartition(".")[0]) for m in modules}
    rooms = sorted(set(package_of.values()))
    room_arrows = {(package_of[a], package_of[b]) for a in modules for b in arrows[a] if package_of[a] != package_of[b]}
    progs = programs(modules)
    upward = sorted((a, b) for a in modules if a not in progs for b in arrows[a] if b in progs)
    lines = sum(len((ROOT / (m.replace(".", "/") + ".py")).read_text().splitlines())
                for m in modules if (ROOT / (m.replace(".", "/") + ".py")).exists())
    lines += sum(len((ROOT / m.replace(".", "/") / "__init__.py").read_text().splitlines())
                 for m in modules if (ROOT / m.replace(".", "/") / "__init__.py").exists())
    print(f"modules {len(modules)}  lines {lines}  module arrows {sum(map(len, arrows.values()))}")
    print(f"rooms (packages) {len(rooms)}  room arrows {len(room_arrows)}")
    print(f"programs {len(progs)}: {', '.join(sorted(p.removeprefix(PACKAGE + '.') for p in progs))}")
    print(f"library -> program arrows {len(upward)}")
    for a, b in upward:
        print(f"  {a} -> {b}")
    found = circles(modules, arrows)
    print(f"import circles {len(found)}")
    for component in found:
        print("  " + " <-> ".join(component))
    return 0


if __name__ == "__main__":
    sys.exit(main())
