"""Faults a long run meets: SIGKILL at any moment (then ``--resume auto``), and 2-process gloo jobs with a
frozen rank, a killed rank, a rank failing on its own and ranks started with different flags.

Every subprocess has a hard timeout, so a regression that hangs fails the test instead of CI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

import pytest
from script_runner import ScriptProcess, run_script, start_script

from image_classification.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

HARNESS = str(Path(__file__).resolve().parent / "kill_harness.py")
SYNTHETIC = ["--data-backend", "synthetic", "--arch", "cifar_resnet20", "--image-size", "16", "-b", "2", "-j", "0",
             "--num-classes", "3", "--lr", "0.05", "--seed", "1", "-p", "1"]


def _env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(extra)
    return env


def _harness(repo: Path, moment: str, count: int, args: List[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return run_script(HARNESS, [moment, str(count), *args], cwd=repo, env=_env(), timeout=timeout)


def _temporaries(ws: Path) -> List[str]:
    return sorted(p.name for p in ws.iterdir() if p.name.endswith(".tmp"))


def test_sigkill_at_any_moment_then_resume_auto(e2e: SimpleNamespace, tmp_path: Path) -> None:
    """Killed mid-checkpoint-write, mid-validation, mid-best-copy and mid-epoch: every time the checkpoint
    loads, the epoch count never goes back, partial files are cleared, and the run completes."""
    ws = tmp_path / "ws"
    recipe = [*SYNTHETIC, "--prof", "3", "--epochs", "4", "--use-ema", "0.9", "--precise-bn", "2",
              "--workspace", str(ws), "--resume", "auto"]
    epochs = [0]

    def after_kill(result: subprocess.CompletedProcess, expect_temporary: bool) -> None:
        assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
        if expect_temporary:
            assert _temporaries(ws), "the kill should have left a partial temporary"
        checkpoint = load_checkpoint(ws / "checkpoint.pth.tar")  # always loadable
        assert checkpoint["epoch"] >= epochs[-1]
        epochs.append(checkpoint["epoch"])
        if (ws / "model_best.pth.tar").exists():
            load_checkpoint(ws / "model_best.pth.tar")

    # 1. half-way through copying the first best model (checkpoint.pth.tar of epoch 0 is complete)
    after_kill(_harness(e2e.repo, "best-copy", 1, recipe), expect_temporary=True)
    assert epochs[-1] == 1 and not (ws / "model_best.pth.tar").exists()
    # 2. half-way through the 2nd checkpoint write of the resumed run: epoch 1's final checkpoint (its
    #    pre-validation one is on disk)
    after_kill(_harness(e2e.repo, "checkpoint-write", 2, recipe), expect_temporary=True)
    assert epochs[-1] == 2 and load_checkpoint(ws / "checkpoint.pth.tar")["pending_validation"] is True
    # 3. during that validation, redone first thing on resume (the partial files of 1-2 are cleared at start)
    after_kill(_harness(e2e.repo, "validation", 1, recipe), expect_temporary=False)
    assert _temporaries(ws) == [] and epochs[-1] == 2
    # 4. from outside, at an arbitrary point of a training epoch
    proc = start_script(HARNESS, ["never", "0", *recipe, "--prof", "200"], cwd=e2e.repo, env=_env())
    try:
        deadline = time.time() + 90
        raport = ws / "raport.json"
        start_size = raport.stat().st_size
        while time.time() < deadline and raport.stat().st_size < start_size + 2000:  # a few iterations logged
            time.sleep(0.05)
        proc.kill()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    after_kill(subprocess.CompletedProcess(proc.args, proc.returncode, "", err), expect_temporary=False)
    # finally the run completes, clearing what the kills left behind
    result = _harness(e2e.repo, "never", 0, recipe)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _temporaries(ws) == [] and load_checkpoint(ws / "checkpoint.pth.tar")["epoch"] == 4
    assert epochs == sorted(epochs)


# ------------------------------------------------------------------------------------ 2-process gloo jobs
def _kill_all(procs: List[ScriptProcess]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()


def _finish(procs: List[ScriptProcess], timeout: float = 120) -> List[subprocess.CompletedProcess]:
    results = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, "", err))
    finally:
        _kill_all(procs)
    return results


def _error_lines(text: str) -> List[str]:
    assert "Traceback" not in text, text[-3000:]
    return [line for line in text.splitlines() if line.startswith("main.py: error: ")]


def _wait_for_training(ws: Path, procs: List[ScriptProcess], timeout: float = 90) -> None:
    deadline = time.time() + timeout
    raport = ws / "raport.json"
    while time.time() < deadline:
        if raport.exists() and raport.read_text().count('"train.loss"') >= 3:
            return
        if any(proc.poll() is not None for proc in procs):
            break
        time.sleep(0.1)
    for proc in procs:
        proc.kill()
    raise AssertionError(f"training did not start: {[p.communicate()[1][-1500:] for p in procs]}")


@pytest.mark.parametrize("fault", ["frozen", "killed"])
def test_lost_rank_is_named_within_the_timeout(e2e: SimpleNamespace, tmp_path: Path, fault: str) -> None:
    ws = tmp_path / "ws"
    args = [*SYNTHETIC, "--epochs", "50", "--dist-timeout", "3", "--workspace", str(ws)]
    procs = e2e.launch_ranks([args, args])
    _wait_for_training(ws, procs)
    stopped = time.time()
    procs[1].send_signal(signal.SIGSTOP if fault == "frozen" else signal.SIGKILL)
    try:
        _, err = procs[0].communicate(timeout=60)
        elapsed = time.time() - stopped
    finally:
        _kill_all(procs)
    lines = _error_lines(err)
    assert procs[0].returncode == 1 and len(lines) == 1, err[-2000:]
    assert "rank 1 stopped responding" in lines[0]
    if fault == "frozen":  # gloo would have waited 30 min by default
        assert "gave up after --dist-timeout 3 s" in lines[0] and elapsed < 3 + 25
    else:
        assert elapsed < 20


def test_a_rank_failing_on_its_own_is_named_with_its_error(e2e: SimpleNamespace, jpeg_folder: Path,
                                                           tmp_path: Path) -> None:
    """DATA may differ per node; rank 1's is missing: its one line, and rank 0 names it with status 2."""
    ws = tmp_path / "ws"
    common = [*e2e.tiny, "--epochs", "1", "--dist-timeout", "20", "--workspace", str(ws)]
    procs = e2e.launch_ranks([[str(jpeg_folder), *common], [str(tmp_path / "missing"), *common]])
    rank0, rank1 = _finish(procs)
    assert rank1.returncode == 2 and _error_lines(rank1.stderr) == [
        f"main.py: error: [rank 1] DATA directory {tmp_path / 'missing'} does not exist"]
    assert rank0.returncode == 2, rank0.stderr[-2000:]
    assert _error_lines(rank0.stderr) == [f"main.py: error: rank 1 failed: DATA directory {tmp_path / 'missing'} "
                                          "does not exist"]


def test_ranks_with_different_flags_are_refused(e2e: SimpleNamespace, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    common = [*SYNTHETIC, "--prof", "2", "--workspace", str(ws)]
    rank0, rank1 = _finish(e2e.launch_ranks([[*common, "--epochs", "1", "-b", "4", "--adv-train", "free"],
                                              [*common, "--epochs", "3", "-b", "8", "--arch", "resnet18_small",
                                               "--adv-train", "free", "--adv-replays", "2"]]))
    assert rank0.returncode == rank1.returncode == 2
    lines = _error_lines(rank0.stderr)
    assert len(lines) == 1 and lines[0].startswith("main.py: error: ranks disagree on: ")
    for needle in ("--arch (rank 0: cifar_resnet20, rank 1: resnet18_small)", "--batch-size (rank 0: 4, rank 1: 8)",
                   "--epochs (rank 0: 1, rank 1: 3)", "--adv-replays (rank 0: 4, rank 1: 2)"):
        assert needle in lines[0]
    assert _error_lines(rank1.stderr) == []  # said once, by rank 0
    assert not ws.exists()

