"""tests/script_runner.py stands for ``subprocess.run``/``Popen`` of ``python SCRIPT``: same argv, working
directory, environment, ``__main__``, exit status, output, exit functions, signals and timeouts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from script_runner import run_script, start_script

PROBE = """\
import atexit, json, multiprocessing, os, sys
atexit.register(lambda: open(os.environ["ATEXIT_FILE"], "w").write("ran"))
print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": sorted(os.environ), "x": os.environ.get("X"),
                  "path0": sys.path[0], "name": __name__, "start": multiprocessing.get_start_method()}))
print("to stderr", file=sys.stderr)
if sys.argv[1] == "raise":
    raise ValueError("boom")
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture()
def probe(tmp_path: Path) -> Path:
    script = tmp_path / "scripts" / "probe.py"
    script.parent.mkdir()
    script.write_text(PROBE)
    return script


def _both(probe: Path, tmp_path: Path, *args: str):
    env = {"X": "1", "PATH": os.environ.get("PATH", ""), "ATEXIT_FILE": str(tmp_path / "atexit_fork")}
    forked = run_script(str(probe), list(args), env=env, cwd=tmp_path)
    env["ATEXIT_FILE"] = str(tmp_path / "atexit_sub")
    plain = subprocess.run([sys.executable, str(probe), *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=60)
    return forked, plain


@pytest.mark.parametrize("code", ["0", "3"])
def test_same_argv_cwd_environment_main_and_exit_status_as_a_fresh_interpreter(probe: Path, tmp_path: Path,
                                                                               code: str) -> None:
    forked, plain = _both(probe, tmp_path, code, "a b")
    assert forked.returncode == plain.returncode == int(code)
    assert forked.stderr == plain.stderr == "to stderr\n"
    got, want = json.loads(forked.stdout), json.loads(plain.stdout)
    want_env = set(want.pop("env")) - {"LC_CTYPE"}  # the interpreter may add a locale coercion variable
    assert set(got.pop("env")) - {"LC_CTYPE"} == want_env
    assert got == want and got["argv"] == [code, "a b"] and got["name"] == "__main__"
    assert got["path0"] == str(probe.parent) and got["x"] == "1"
    assert (tmp_path / "atexit_fork").read_text() == (tmp_path / "atexit_sub").read_text() == "ran"


def test_an_uncaught_exception_is_status_1_with_its_traceback(probe: Path, tmp_path: Path) -> None:
    forked, plain = _both(probe, tmp_path, "raise")
    assert forked.returncode == plain.returncode == 1
    for result in (forked, plain):
        assert "Traceback" in result.stderr and result.stderr.rstrip().endswith("ValueError: boom")


def test_module_mode_is_python_dash_m(tmp_path: Path) -> None:
    data = tmp_path / "x.json"
    data.write_text('{"b": 1, "a": [2]}')
    forked = run_script("json.tool", ["--sort-keys", str(data)], module=True, cwd=tmp_path)
    plain = subprocess.run([sys.executable, "-m", "json.tool", "--sort-keys", str(data)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert forked.returncode == plain.returncode == 0 and forked.stdout == plain.stdout
    assert forked.args == [sys.executable, "-m", "json.tool", "--sort-keys", str(data)]


def test_signals_and_timeouts(tmp_path: Path) -> None:
    script = tmp_path / "sleep.py"
    script.write_text("import os, signal, sys, time\n"
                      "if sys.argv[1] == 'self-kill':\n    os.kill(os.getpid(), signal.SIGKILL)\n"
                      "print('started', flush=True)\ntime.sleep(60)\n")
    assert run_script(str(script), ["self-kill"]).returncode == -signal.SIGKILL
    started = time.time()
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        run_script(str(script), ["sleep"], timeout=3)
    assert time.time() - started < 30 and caught.value.output == "started\n"
    proc = start_script(str(script), ["sleep"])
    with pytest.raises(subprocess.TimeoutExpired):
        proc.communicate(timeout=0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM and out == "started\n"
