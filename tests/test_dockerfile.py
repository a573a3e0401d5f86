"""The Dockerfile cannot be built here: check what it installs is what CI installs, and its basics."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instructions() -> list:
    """Dockerfile instructions with line continuations joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _requirement_lines(path: Path) -> list:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def test_base_image_is_nvidia_pytorch_container() -> None:
    args = {m.group(1): m.group(2) for m in re.finditer(r"^ARG (\w+)=(\S+)", DOCKERFILE, re.M)}
    froms = [line.split()[1] for line in _instructions() if line.startswith("FROM ")]
    assert len(froms) == 1
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], froms[0])
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", image), image


def test_ci_installs_the_requirements_file_the_image_installs() -> None:
    # CI: .ci/run -> scripts/run_tests.sh -> scripts/setup_env.sh -> pip install -r requirements-dev.txt,
    # and requirements-dev.txt includes requirements.txt
    assert "scripts/run_tests.sh" in (ROOT / ".ci" / "run").read_text()
    assert "scripts/setup_env.sh" in (ROOT / "scripts" / "run_tests.sh").read_text()
    setup = (ROOT / "scripts" / "setup_env.sh").read_text()
    assert re.search(r"pip\" install .*-r \"\$reqs\"", setup) and "reqs=requirements-dev.txt" in setup
    assert "-r requirements.txt" in _requirement_lines(ROOT / "requirements-dev.txt")
    # the image: COPY requirements.txt, then pip install from it (torch/torchvision filtered out)
    steps = _instructions()
    assert any(re.fullmatch(r"COPY requirements\.txt \S+", s) for s in steps)
    run = next(s for s in steps if s.startswith("RUN ") and "pip install" in s)
    assert "requirements.txt" in run
    assert not (ROOT / "requirements-docker.txt").exists()


def test_container_filter_keeps_everything_but_torch() -> None:
    """Run the Dockerfile's own grep on requirements.txt: only torch/torchvision lines may disappear."""
    run = next(s for s in _instructions() if s.startswith("RUN ") and "grep -v" in s)
    grep = run[len("RUN "):].split("&&")[0].strip()
    out_file = grep.split(">")[-1].strip()
    grep = grep.replace(out_file, "/dev/stdout")
    kept = subprocess.run(["bash", "-c", grep], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    kept_lines = [line.split("#")[0].strip() for line in kept.splitlines() if line.split("#")[0].strip()]
    original = _requirement_lines(ROOT / "requirements.txt")
    dropped = [line for line in original if line not in kept_lines]
    assert dropped and all(re.match(r"(torch|torchvision)\b", line) for line in dropped)
    assert all(line in original for line in kept_lines)


def test_project_is_copied_and_workdir_set() -> None:
    steps = _instructions()
    assert any(re.fullmatch(r"COPY \. \.?(/\S*)?", s) for s in steps)
    assert any(s.startswith("WORKDIR /") for s in steps)
    assert "docker run --gpus all --ipc=host" in DOCKERFILE
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignore and ".venv" in ignore and "logs/*" in ignore


def test_smoke_test_runs_the_package_on_the_images_torch() -> None:
    """The image's build ends with a smoke test that imports the package and runs a PEDConv ResNet-18; run that
    very command here (on this environment's torch) so it cannot rot."""
    import sys

    run = next(s for s in _instructions() if s.startswith("RUN python -c") and "image_classification" in s)
    code = re.fullmatch(r'RUN python -c "(.*)"', run).group(1)
    assert "build_model('resnet18', 'pedconv'" in code
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("image_classification OK: torch") and "(1, 10)" in out.stdout


def _container_commands(text: str) -> list:
    """The commands shown after a ``docker run`` line (joined across backslash continuations, comment prefixes and
    '(inside)' dropped) up to the end of that example."""
    lines = re.sub(r"\\\n#?\s*", " ", text).splitlines()
    commands, inside = [], False
    for line in lines:
        stripped = re.sub(r"^#\s*(Run:|\(inside\))?\s*", "", line.strip()).strip()
        if "docker run" in stripped:
            assert "-v $PWD/logs:/workspace/pedconv/logs" in stripped, stripped  # the host keeps logs/
            inside = True
            continue
        if inside and stripped.startswith("```"):
            inside = False
        elif inside and "main.py" in stripped:
            commands.append(stripped)
    return commands


def test_every_documented_container_command_writes_under_the_mounted_logs() -> None:
    """docs/training.md's docker line and the Dockerfile's header trained without --workspace: checkpoints and the
    raport went to /workspace/pedconv, which is not mounted and vanished with --rm."""
    for text in (DOCKERFILE, (ROOT / "docs" / "training.md").read_text()):
        commands = _container_commands(text)
        assert commands
        for command in commands:
            assert re.search(r"--workspace logs/\S+", command), command
