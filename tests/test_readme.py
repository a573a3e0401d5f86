"""The README and its docs pages: every ``python`` / ``torchrun`` entry point in their code blocks answers
``--help``, every script and recipe they name exists, the set-up says how to enter the environment the
commands run in, and the README stays a hub (at most 12 KB, a table of contents, a link to every page; no
section repeated across pages, every relative link and anchor resolves)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import List, Set, Tuple

import pytest
from script_runner import run_script

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: the README and the per-topic pages it links (docs/results/ holds generated reports)
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _pages_text() -> str:
    return "\n".join(page.read_text() for page in PAGES)


def _shell_commands(text: str) -> List[str]:
    """Commands of the ```bash blocks, continuation lines joined, comments dropped."""
    commands: List[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _entry_points(commands: List[str]) -> Set[Tuple[str, bool]]:
    """(target, is_module) of each ``python X`` / ``python -m M`` / ``torchrun ... X|-m M`` command."""
    found: Set[Tuple[str, bool]] = set()
    for command in commands:
        words = shlex.split(command)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # CUDA_VISIBLE_DEVICES=0 python ...
            words = words[1:]
        if not words or words[0] not in ("python", "torchrun"):
            continue
        rest = words[1:]
        if words[0] == "torchrun":  # skip the launcher's own options up to the program
            rest = [w for w in rest if w == "-m" or not w.startswith("-")]
            rest = rest[next(i for i, w in enumerate(rest) if w == "-m" or w.endswith(".py")):]
        if rest[0] == "-m":
            found.add((rest[1], True))
        elif rest[0].endswith(".py"):
            found.add((str(Path(rest[0])), False))
    return found


def test_the_setup_says_how_to_enter_the_environment() -> None:
    text = README.read_text()
    setup = text[text.index("## Two commands"):text.index("\n## ", text.index("## Two commands") + 5)]
    assert "source .venv/bin/activate" in setup
    assert "source $VENV/bin/activate" in (ROOT / "scripts" / "setup_env.sh").read_text()
    assert ".venv/bin/python" not in text.replace("`.venv/bin/python`", "")  # one way to run commands


def test_scripts_and_recipes_named_by_commands_exist() -> None:
    missing = []
    for command in _shell_commands(_pages_text()):
        for word in shlex.split(command):
            if re.fullmatch(r"(scripts|configs)/[\w./-]+\.(sh|py|yaml)", word) and not (ROOT / word).is_file():
                missing.append(word)
    assert not missing, missing


#: every program of image_classification/tools/ (a module with a ``__main__`` block)
TOOLS = sorted(f"image_classification.tools.{path.stem}"
               for path in (ROOT / "image_classification" / "tools").glob("*.py")
               if '__name__ == "__main__"' in path.read_text())
ENTRY_POINTS = sorted(_entry_points(_shell_commands(_pages_text())) | {(tool, True) for tool in TOOLS})


def test_every_program_is_documented() -> None:
    text = _pages_text()
    assert len(TOOLS) >= 13
    missing = [tool for tool in TOOLS if f"python -m {tool}" not in text]
    assert not missing, f"document these programs in README.md or docs/: {missing}"


def test_the_pages_have_the_entry_points_users_need() -> None:
    names = {target for target, _ in ENTRY_POINTS}
    assert {"main.py", "multiproc.py", "classify.py", "image_classification.tools.profiler",
            "image_classification.tools.export"} <= names, names
    assert LOADS_CHECKPOINTS <= names  # each is checked for --trust-checkpoints below


# programs that load checkpoints: the untrusted-pickle refusal advises --trust-checkpoints, so each must have it
LOADS_CHECKPOINTS = {"main.py", "classify.py", *(f"image_classification.tools.{name}" for name in (
    "classify", "export", "gradcam", "weight_variation", "coefficients", "train_detection", "train_segmentation"))}


@pytest.mark.parametrize("target, module", ENTRY_POINTS, ids=[t for t, _ in ENTRY_POINTS])
def test_every_entry_point_answers_help(target: str, module: bool) -> None:
    run = run_script(target if module else str(ROOT / target), ["--help"], module=module, cwd=ROOT, timeout=180)
    assert run.returncode == 0, f"{target} --help: rc {run.returncode}\n{run.stderr[-2000:]}"
    assert "usage" in run.stdout.lower(), run.stdout[:500]
    if target in LOADS_CHECKPOINTS:
        assert "--trust-checkpoints" in run.stdout


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings(text: str) -> List[str]:
    """The Markdown headings outside code blocks."""
    found, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,4} ", line):
            found.append(line.lstrip("#").strip())
    return found


def test_the_readme_is_a_hub_that_links_every_page() -> None:
    text = README.read_text()
    assert len(text.encode()) <= 12 * 1024, f"README.md is {len(text.encode())} bytes; move details to docs/"
    assert "**Contents:**" in text
    linked = set(re.findall(r"\]\((docs/[\w/.-]+\.md)\)", text))
    assert {f"docs/{page.name}" for page in PAGES[1:]} <= linked, linked


def test_no_section_is_repeated_across_pages() -> None:
    seen: dict = {}
    for page in PAGES:
        for heading in _headings(page.read_text()):
            if heading.startswith(("Contents", "Back to")):
                continue
            seen.setdefault(heading.lower(), []).append(page.name)
    repeated = {h: names for h, names in seen.items() if len(names) > 1}
    assert not repeated, repeated


def test_relative_links_and_anchors_resolve() -> None:
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md" and anchor not in {_slug(h) for h in _headings(file.read_text())}:
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
