"""Run a repository script as ``python SCRIPT ARGS`` would, in a child forked from a server that already imported
torch and torchvision.

Importing torch and torchvision takes about 4 s of CPU (torchvision.ops pulls in torch._dynamo), which the
end-to-end tests would otherwise pay once per ``main.py`` run. The children come from Python's ``forkserver``
(``multiprocessing``), whose server imports only those two packages and runs no tensor code, so no OpenMP pool
exists to be forked. Each child is a process of its own: it gets the test's argv, environment (replaced whole),
working directory, the default multiprocessing start method and a fresh ``__main__``; it imports the project
itself, writes its stdout/stderr to files, runs the interpreter's exit functions, and ends with the exit status a
fresh interpreter would give (a signal as ``-signum``). ``run_script`` stands for ``subprocess.run`` and
``start_script`` for ``subprocess.Popen``, in the subset of their behaviour the tests use.

Tests that need what only a fresh interpreter has (interpreter flags, import-time behaviour, environment read
when torch is imported, such as ``TRITON_INTERPRET``) keep ``subprocess``.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import weakref
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

_PRELOAD = ["torch", "torchvision"]
_lock = threading.Lock()
_context: Optional[multiprocessing.context.ForkServerContext] = None


def forkserver_context() -> multiprocessing.context.ForkServerContext:
    """The forkserver context, its server started with torch and torchvision imported and OMP_NUM_THREADS=1
    (read when torch loads OpenMP). Tests that start worker functions in processes of their own use it in
    place of ``spawn``, which would import torch again in every process."""
    global _context
    with _lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(_PRELOAD)
            saved = os.environ.get("OMP_NUM_THREADS")
            os.environ["OMP_NUM_THREADS"] = "1"
            try:
                from multiprocessing import forkserver

                forkserver.ensure_running()
            finally:
                if saved is None:
                    os.environ.pop("OMP_NUM_THREADS", None)
                else:
                    os.environ["OMP_NUM_THREADS"] = saved
            _context = context
    return _context


def _child(target: str, module: bool, args: Sequence[str], env: Mapping[str, str], cwd: str, out: str,
           err: str) -> None:
    """In the forked child: become ``python [-m] TARGET ARGS`` and run it as ``__main__``."""
    os.environ.clear()
    os.environ.update(env)
    multiprocessing.set_start_method(None, force=True)  # the interpreter's default again (the server's is inherited)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    sys.argv = [target, *args]
    # as the interpreter does: `python SCRIPT` puts the script's folder first, `python -m MODULE` the working one
    sys.path.insert(0, os.getcwd() if module else str(Path(target).resolve().parent))
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    finally:
        atexit._run_exitfuncs()  # multiprocessing ends its children with os._exit, which skips them


class ScriptProcess:
    """The part of ``subprocess.Popen`` (text mode, stdout and stderr captured) the tests use, for a forked run."""

    def __init__(self, command: List[str], process: multiprocessing.process.BaseProcess, tmp: str) -> None:
        self.args, self._process, self._tmp = command, process, tmp
        self.pid = process.pid
        self.returncode: Optional[int] = None
        weakref.finalize(self, shutil.rmtree, tmp, True)  # the output files go with this object

    def poll(self) -> Optional[int]:
        if self.returncode is None and not self._process.is_alive():
            self._process.join()
            self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: Optional[float] = None) -> Tuple[str, str]:
        """Wait for the end (``TimeoutExpired`` past ``timeout``, the process left running); its stdout, stderr."""
        self._process.join(timeout)
        out, err = (self._read(name) for name in ("stdout", "stderr"))
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout, output=out, stderr=err)
        return out, err

    def _read(self, name: str) -> str:
        path = os.path.join(self._tmp, name)
        return Path(path).read_text(errors="replace") if os.path.exists(path) else ""


def start_script(target: str, args: Sequence[str], *, module: bool = False, env: Optional[Mapping[str, str]] = None,
                 cwd: Optional[Path] = None) -> ScriptProcess:
    """``subprocess.Popen([sys.executable, TARGET, *args], stdout=PIPE, stderr=PIPE, text=True, ...)``, forked.

    ``module=True`` runs ``python -m TARGET``. ``env`` is the child's whole environment (default: this one).
    """
    command = [sys.executable, *(["-m"] if module else []), target, *args]
    tmp = tempfile.mkdtemp(prefix="script_runner")
    process = forkserver_context().Process(target=_child, args=(target, module, list(args), dict(env or os.environ),
                                                     str(cwd or os.getcwd()), os.path.join(tmp, "stdout"),
                                                     os.path.join(tmp, "stderr")))
    process.start()
    return ScriptProcess(command, process, tmp)


def run_script(target: str, args: Sequence[str], *, module: bool = False, env: Optional[Mapping[str, str]] = None,
               cwd: Optional[Path] = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, TARGET, *args], capture_output=True, text=True, timeout=...)``, forked:
    a run past ``timeout`` is killed and raises ``subprocess.TimeoutExpired``."""
    process = start_script(target, args, module=module, env=env, cwd=cwd)
    try:
        out, err = process.communicate(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)
