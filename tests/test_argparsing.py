"""Every program's bad flag is one line ending in "(see --help)", exit status 2, no usage block."""

from __future__ import annotations

from pathlib import Path

import pytest
from script_runner import run_script

from image_classification.argparsing import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]

PROGRAMS = [
    ("main.py", False, "main.py"),
    ("classify.py", False, "classify.py"),
    ("image_classification.tools.export", True, "python -m image_classification.tools.export"),
    ("image_classification.tools.profiler", True, "python -m image_classification.tools.profiler"),
    ("image_classification.tools.benchmark", True, None),
    ("image_classification.tools.gradcam", True, None),
    ("image_classification.tools.train_segmentation", True, None),
    ("scripts/fashion_mnist_study.py", False, None),
]


def test_error_is_one_line_with_a_pointer_to_help(capsys: pytest.CaptureFixture) -> None:
    parser = ArgumentParser(prog="tool")
    parser.add_argument("--n", type=int, required=True)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--n", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "tool: error: argument --n: invalid int value: 'x' (see --help)\n"


@pytest.mark.parametrize("target, module, prog", PROGRAMS, ids=[p[0] for p in PROGRAMS])
def test_every_program_answers_a_bad_flag_in_one_line(target: str, module: bool, prog: str) -> None:
    run = run_script(target if module else str(ROOT / target), ["--no-such-flag"], module=module, cwd=ROOT)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and lines[0].endswith("(see --help)") and "usage" not in run.stderr, run.stderr
    assert "--no-such-flag" in lines[0] or "arguments are required" in lines[0]
    if prog is not None:
        assert lines[0].startswith(f"{prog}: error: ")


def test_main_names_the_flag_not_an_internal_type(capsys: pytest.CaptureFixture) -> None:
    from image_classification.training.cli import parse_args

    for argv, needle in ((["--lr-steps", "nan"], "argument --lr-steps: expected an integer, got 'nan'"),
                         (["--autotune-budget", "-1"], "argument --autotune-budget: must be >= 0, got -1"),
                         (["--compile-backend", "eager"], "--compile-backend eager without --compile")):
        with pytest.raises(SystemExit):
            parse_args(["--data-backend", "synthetic", *argv])
        err = capsys.readouterr().err
        assert needle in err and "_non_negative_int" not in err


def test_a_program_piped_into_head_stops_quietly() -> None:
    """``python -m ...tools.paper_tables | head -1``: the reader closes the pipe after one line; the program stops
    with 141 (128 + SIGPIPE) and no BrokenPipeError traceback (run_program)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    program = ("from image_classification.argparsing import run_program\n"
               "def main():\n    for i in range(200000):\n        print('row', i)\n    return 0\n"
               "run_program(main)")
    proc = subprocess.Popen([sys.executable, "-c", program], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"row 0\n"
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and b"Traceback" not in err and b"BrokenPipeError" not in err, err[-2000:]
