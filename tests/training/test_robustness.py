"""Runs that must never silently go wrong (issue "Trustworthy runs"): divergence, schedules on resume,
overwritten results, concurrent runs, permissions, partial checkpoints, bad checkpoints.

In-process ``main()`` on the synthetic backend (a few tiny iterations): ``main()`` is what main.py runs.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import List, Tuple

import pytest
import torch

from image_classification.training import lifecycle
from image_classification.training.checkpoint import WorkspaceLock, load_checkpoint
from image_classification.training.logger import raport_values, read_raport
from image_classification.training.trainer import main

TINY = ["--data-backend", "synthetic", "--arch", "cifar_resnet20", "--image-size", "16", "-b", "2", "--prof", "2",
        "-j", "0", "--num-classes", "3", "--lr", "0.05", "--seed", "1", "-p", "1"]


def _run(argv: List[str], capsys: pytest.CaptureFixture) -> Tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse-level errors
        code = int(exc.code)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def _signal_before(monkeypatch: pytest.MonkeyPatch, step: str, signum: int) -> None:
    """``lifecycle.<step>`` sends ``signum`` to this process, then runs as usual."""
    real = getattr(lifecycle, step)

    def signalled(*args, **kwargs):  # noqa: ANN002, ANN003
        os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(lifecycle, step, signalled)


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("main.py: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _ok(argv: List[str], capsys: pytest.CaptureFixture) -> str:
    code, err = _run(argv, capsys)
    assert code == 0, err[-2000:]
    return err


# ------------------------------------------------------------------------------------------ divergence
def test_non_finite_training_loss_stops_with_epoch_and_iteration(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ws = tmp_path / "ws"
    code, err = _run([*TINY, "--prof", "4", "--lr", "1e30", "--epochs", "2", "--workspace", str(ws)], capsys)
    assert code == 3
    line = _error_line(err)
    assert "training loss is nan at epoch 0 iteration" in line
    assert not (ws / "checkpoint.pth.tar").exists() and not (ws / "model_best.pth.tar").exists()
    losses = [value for _, value in raport_values(read_raport(ws / "raport.json"), "train.loss")]
    assert losses and math.isnan(losses[-1])  # the raport shows what stopped the run


def test_non_finite_validation_never_becomes_the_best_model(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real_validate = lifecycle.validate

    def nan_validate(*args, **kwargs):
        metrics = real_validate(*args, **kwargs)
        return dict(metrics, **{"val.loss": math.nan})

    monkeypatch.setattr(lifecycle, "validate", nan_validate)
    ws = tmp_path / "ws"
    code, err = _run([*TINY, "--epochs", "2", "--workspace", str(ws)], capsys)
    assert code == 3 and "validation loss of the model is nan after epoch 0" in _error_line(err)
    assert not (ws / "model_best.pth.tar").exists()
    saved = load_checkpoint(ws / "checkpoint.pth.tar")  # the trained epoch, written before validating it
    assert saved["epoch"] == 1 and saved["pending_validation"] is True


def test_non_finite_weights_are_never_saved_and_never_resumed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ws = tmp_path / "ws"
    _ok([*TINY, "--epochs", "2", "--run-epochs", "1", "--workspace", str(ws)], capsys)
    path = ws / "checkpoint.pth.tar"
    checkpoint = load_checkpoint(path)
    key = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    checkpoint["state_dict"][key] = torch.full_like(checkpoint["state_dict"][key], math.nan)
    torch.save(checkpoint, path)
    for extra in (["--resume", "auto"], ["--evaluate", "--pretrained-weights", str(path)]):
        code, err = _run([*TINY, "--epochs", "2", "--workspace", str(tmp_path / "other" if "--evaluate" in extra
                                                                         else ws), *extra], capsys)
        assert code == 2 and "non-finite values (NaN/inf) in 1 tensor(s)" in _error_line(err) and key in err


# ------------------------------------------------------------------------------------ schedule on resume
def test_resume_follows_the_current_schedule_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """1 epoch of a 100-epoch cosine run, then --epochs 2 --lr 0.5: the lr must be the 2-epoch cosine at 0.5."""
    ws = tmp_path / "ws"
    _ok([*TINY, "--epochs", "100", "--lr-schedule", "cosine", "--run-epochs", "1", "--workspace", str(ws)], capsys)
    err = _ok([*TINY, "--epochs", "2", "--lr", "0.5", "--lr-schedule", "cosine", "--resume", "auto",
               "--workspace", str(ws)], capsys)
    assert "main.py: note: resuming" in err and "--lr 0.05 -> 0.5" in err and "--epochs 100 -> 2" in err
    records = read_raport(ws / "raport.json")
    lrs = [value for step, value in raport_values(records, "train.lr") if step[0] == 1]
    steps = [2, 3]  # optimizer steps of epoch 1 (2 per epoch), cosine over 4 steps
    assert lrs == pytest.approx([0.5 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in steps])
    parameters = [r["data"] for r in records if r.get("step") == "PARAMETER"]
    assert parameters[-1]["lr"] == 0.5 and parameters[-1]["epochs"] == 2


# -------------------------------------------------------------------------------- results are not replaced
def test_a_new_run_never_replaces_a_finished_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ws = tmp_path / "ws"
    _ok([*TINY, "--epochs", "1", "--gather-checkpoints", "--workspace", str(ws)], capsys)
    before = {p.name: p.stat().st_mtime_ns for p in ws.iterdir()}
    assert set(before) == {"checkpoint.pth.tar", "checkpoint-0001.pth.tar", "model_best.pth.tar", "raport.json"}
    code, err = _run([*TINY, "--epochs", "1", "--workspace", str(ws)], capsys)
    line = _error_line(err)
    assert code == 2 and "already holds a run" in line and "--resume auto" in line and "--overwrite" in line
    assert {p.name: p.stat().st_mtime_ns for p in ws.iterdir()} == before
    # an evaluation must not replace a training raport either
    code, err = _run([*TINY, "--evaluate", "--pretrained-weights", str(ws / "model_best.pth.tar"),
                      "--workspace", str(ws)], capsys)
    assert code == 2 and "holds the raport of a training run" in _error_line(err)
    # --overwrite: a fresh run, the old run's files gone (no stale per-epoch copy or best model left)
    _ok([*TINY, "--epochs", "1", "--training-only", "--overwrite", "--workspace", str(ws)], capsys)
    assert sorted(p.name for p in ws.iterdir()) == ["checkpoint.pth.tar", "raport.json"]


def test_second_run_in_a_locked_workspace_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    with WorkspaceLock(ws):
        code, err = _run([*TINY, "--epochs", "1", "--resume", "auto", "--workspace", str(ws)], capsys)
    assert code == 2 and f"is in use by another run (pid {os.getpid()} on" in _error_line(err)
    _ok([*TINY, "--epochs", "1", "--resume", "auto", "--workspace", str(ws)], capsys)  # released: fine
    assert not (ws / ".main.lock").exists()


def test_checkpoints_respect_the_umask(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    previous = os.umask(0o027)
    try:
        _ok([*TINY, "--epochs", "1", "--workspace", str(tmp_path / "ws")], capsys)
    finally:
        os.umask(previous)
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):
        assert (tmp_path / "ws" / name).stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600


def test_partial_checkpoints_of_a_killed_run_removed_at_start(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ws = tmp_path / "ws"
    _ok([*TINY, "--epochs", "2", "--run-epochs", "1", "--workspace", str(ws)], capsys)
    leftovers = [ws / ".checkpoint.pth.tar.pid4242.ab_cd12.tmp", ws / ".model_best.pth.tar.x7y8z9.tmp"]
    for path in leftovers:
        path.write_bytes(b"\0" * 1000)  # fresh (the old rule waited an hour)
    keep = ws / ".notes.txt.abcdefgh.tmp"
    keep.write_text("not ours")
    err = _ok([*TINY, "--epochs", "2", "--resume", "auto", "--workspace", str(ws)], capsys)
    assert "removed 2 partial checkpoint(s)" in err
    assert not any(p.exists() for p in leftovers) and keep.exists()


# ------------------------------------------------------------------------------ validation after saving
def test_a_failing_validation_loses_no_epoch(tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A validation that fails after a training epoch keeps that epoch: the checkpoint is saved with the validation
    pending, and the resumed run validates it first."""
    from image_classification.data import DataError

    real_validate = lifecycle.validate

    def broken(*args, **kwargs):
        raise DataError("cannot read image /data/val/x/broken.jpg: truncated")

    monkeypatch.setattr(lifecycle, "validate", broken)
    ws = tmp_path / "ws"
    code, err = _run([*TINY, "--epochs", "2", "--workspace", str(ws)], capsys)
    assert code == 2 and "broken.jpg" in _error_line(err)
    saved = load_checkpoint(ws / "checkpoint.pth.tar")
    assert saved["epoch"] == 1 and saved["pending_validation"] is True
    monkeypatch.setattr(lifecycle, "validate", real_validate)  # image fixed: resume validates epoch 0 first
    _ok([*TINY, "--epochs", "2", "--resume", "auto", "--workspace", str(ws)], capsys)
    epochs = [r["step"] for r in read_raport(ws / "raport.json") if r["type"] == "LOG" and len(r["step"]) == 1
              and "val.top1" in r["data"]]
    assert epochs == [[0], [1]]
    assert (ws / "model_best.pth.tar").is_file() and load_checkpoint(ws / "checkpoint.pth.tar")["epoch"] == 2


# --------------------------------------------------------------------------------------- bad checkpoints
def test_checkpoint_with_a_non_integer_epoch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ws = tmp_path / "ws"
    _ok([*TINY, "--epochs", "2", "--run-epochs", "1", "--workspace", str(ws)], capsys)
    checkpoint = load_checkpoint(ws / "checkpoint.pth.tar")
    checkpoint["epoch"] = "one"
    torch.save(checkpoint, ws / "checkpoint.pth.tar")
    code, err = _run([*TINY, "--epochs", "2", "--resume", "auto", "--workspace", str(ws)], capsys)
    assert code == 2 and "'epoch' must be a non-negative integer, got 'one'" in _error_line(err)


def test_unsafe_global_named_with_the_flag_to_trust_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))

    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "payload": Evil()}, path)
    code, err = _run([*TINY, "--evaluate", "--pretrained-weights", str(path), "--workspace", str(tmp_path / "ws")],
                     capsys)
    line = _error_line(err)
    assert code == 2 and "references posix.system" in line and "--trust-checkpoints" in line
    assert "this must never run" not in capsys.readouterr().out


def test_pretrained_weights_with_resume_auto_says_which_wins(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ws = tmp_path / "ws"
    _ok([*TINY, "--epochs", "2", "--run-epochs", "1", "--workspace", str(ws)], capsys)
    err = _ok([*TINY, "--epochs", "2", "--resume", "auto", "--pretrained-weights", str(ws / "model_best.pth.tar"),
               "--workspace", str(ws)], capsys)
    assert "--pretrained-weights" in err and "not used: resuming from" in err


def test_raport_in_a_new_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ws = tmp_path / "ws"
    _ok([*TINY, "--epochs", "1", "--training-only", "--raport-file", "logs/deep/raport.json", "--workspace",
         str(ws)], capsys)
    assert read_raport(ws / "logs" / "deep" / "raport.json")[-1]["data"]["summary.epochs"] == 1


def test_full_disk_is_named(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's zip writer reports ENOSPC as "enforce fail ... unexpected pos"; the user must read 'No space'."""
    import shutil as shutil_module

    from image_classification.training.checkpoint import save as module

    def full_save(obj, handle, *args, **kwargs):
        handle.write(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    monkeypatch.setattr(module.torch, "save", full_save)
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(module.shutil, "disk_usage", lambda path: usage._replace(free=4096))
    ws = tmp_path / "ws"
    code, err = _run([*TINY, "--epochs", "1", "--workspace", str(ws)], capsys)
    line = _error_line(err)
    assert code == 2 and "No space left on device (0.0 MiB free in" in line and "checkpoint.pth.tar" in line
    assert [p.name for p in ws.iterdir() if p.name.endswith(".tmp")] == []



# ------------------------------------------------------------------------------------------- precise BN
def test_precise_bn_statistics_are_what_was_validated_and_saved(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ws, plain = tmp_path / "ws", tmp_path / "plain"
    _ok([*TINY, "--conv", "pedconv", "--epochs", "1", "--use-ema", "0.5", "--precise-bn", "2", "--workspace",
         str(ws)], capsys)
    _ok([*TINY, "--conv", "pedconv", "--epochs", "1", "--use-ema", "0.5", "--workspace", str(plain)], capsys)
    saved, running = load_checkpoint(ws / "checkpoint.pth.tar"), load_checkpoint(plain / "checkpoint.pth.tar")
    key = "bn1.running_var"
    assert not torch.equal(saved["state_dict"][key], running["state_dict"][key])  # recomputed, not the EMA
    assert not torch.equal(saved["ema"][f"module.{key}"], running["ema"][f"module.{key}"])  # the EMA model too
    logged = [r["data"] for r in read_raport(ws / "raport.json") if r.get("step") == [0]][0]
    _ok([*TINY, "--conv", "pedconv", "--evaluate", "--pretrained-weights", str(ws / "checkpoint.pth.tar"),
         "--workspace", str(tmp_path / "eval")], capsys)
    evaluated = read_raport(tmp_path / "eval" / "raport.json")[-1]["data"]
    assert evaluated["val.top1"] == logged["val.top1"]
    assert evaluated["val.loss"] == pytest.approx(logged["val.loss"], rel=1e-6)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_amp_trains_dcd(tmp_path: Path, capsys: pytest.CaptureFixture, dtype: str) -> None:
    """--amp with DCD crashed on its first step (baddbmm_ with a float operand and a half input)."""
    _ok([*TINY, "--conv", "dcd", "--amp", "--amp-dtype", dtype, "--epochs", "1", "--training-only",
         "--workspace", str(tmp_path / "ws")], capsys)


def test_trusted_checkpoint_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import datetime

    ws = tmp_path / "ws"
    _ok([*TINY, "--epochs", "1", "--workspace", str(ws)], capsys)
    checkpoint = load_checkpoint(ws / "model_best.pth.tar")
    checkpoint["created"] = datetime.date(2021, 11, 22)  # outside torch's weights_only allowlist
    torch.save(checkpoint, tmp_path / "dated.pth.tar")
    argv = [*TINY, "--evaluate", "--pretrained-weights", str(tmp_path / "dated.pth.tar")]
    code, err = _run([*argv, "--workspace", str(tmp_path / "a")], capsys)
    assert code == 2 and "references datetime.date" in _error_line(err)
    _ok([*argv, "--trust-checkpoints", "--workspace", str(tmp_path / "b")], capsys)


@pytest.mark.parametrize("message, expected", [
    ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
     "1228800000000 bytes. Error code 12 (Cannot allocate memory)", "the machine cannot allocate 1144.4 GiB"),
    ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.1 GiB",
     "the GPU cannot allocate 20.00 GiB"),
])
def test_an_allocation_the_machine_cannot_serve_is_one_line(message: str, expected: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Absurd sizes (-b 100000000, --image-size 100000) end in one line naming the size and what to lower, exit 2,
    instead of the allocator's traceback."""
    from image_classification.training import build

    def build_network(*args, **kwargs):  # noqa: ANN002, ANN003
        raise RuntimeError(message)

    monkeypatch.setattr(build, "build_network", build_network)
    code, err = _run([*TINY, "--epochs", "1", "--workspace", str(tmp_path / "ws")], capsys)
    line = _error_line(err)
    assert code == 2 and line == (f"main.py: error: out of memory: {expected} for this run; lower -b (images per "
                                  "process), --image-size or the model's size (or --amp on a GPU)")


def test_a_full_disk_under_the_raport_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from image_classification.training.logger import RaportWriter

    real = RaportWriter._write

    def write(self, record):  # noqa: ANN001
        if isinstance(record.get("step"), list) and record["step"]:  # the first training record
            self._fail(OSError(errno.ENOSPC, "No space left on device"))
        real(self, record)

    monkeypatch.setattr(RaportWriter, "_write", write)
    code, err = _run([*TINY, "--epochs", "1", "--workspace", str(tmp_path / "ws")], capsys)
    line = _error_line(err)
    assert code == 2 and "cannot write the raport" in line and "No space left on device" in line


def test_two_sigterms_during_an_epoch_still_save(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Two SIGTERMs 50 ms apart during an epoch ended main.py at once ('second SIGTERM: stopping now without
    saving'), with no checkpoint at all; a SIGTERM asks for the save however many arrive."""
    import signal
    import threading

    from image_classification.training.checkpoint import load_checkpoint

    real = lifecycle.train_one_epoch

    def train(*args, **kwargs):  # noqa: ANN002, ANN003
        def preempt() -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=preempt).start()
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(lifecycle, "train_one_epoch", train)
    ws = tmp_path / "ws"
    code, err = _run([*TINY, "--epochs", "3", "--workspace", str(ws)], capsys)
    assert code == 128 + signal.SIGTERM, err
    assert "main.py: SIGTERM again: still stopping after saving a checkpoint" in err and "Traceback" not in err
    assert (ws / "checkpoint.pth.tar").is_file() and load_checkpoint(ws / "checkpoint.pth.tar")["epoch"] >= 0


def test_sigusr1_to_main_py_saves_like_sigterm(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """SLURM's --signal=USR1@300 without B: signals the tasks themselves: main.py was killed (138), no checkpoint."""
    import signal

    _signal_before(monkeypatch, "train_one_epoch", signal.SIGUSR1)
    ws = tmp_path / "ws"
    code, err = _run([*TINY, "--epochs", "3", "--workspace", str(ws)], capsys)
    assert code == 128 + signal.SIGUSR1 and "SIGUSR1 received" in err, err
    assert load_checkpoint(ws / "checkpoint.pth.tar")["epoch"] == 0


def test_signals_during_a_checkpoint_write_wait_for_it(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Two SIGTERMs while main.py writes its epoch checkpoint: the write completes (no temporary left), the run
    stops after it with 143 and a complete checkpoint, the second signal said in one line."""
    import signal

    from image_classification.training.checkpoint import load_checkpoint

    real = lifecycle.save_checkpoint

    def save(*args, **kwargs):  # noqa: ANN002, ANN003
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(lifecycle, "save_checkpoint", save)
    ws = tmp_path / "ws"
    code, err = _run([*TINY, "--epochs", "3", "--workspace", str(ws)], capsys)
    assert code == 128 + signal.SIGTERM
    assert "main.py: SIGTERM again while the checkpoint is written: stopping once it is complete" in err
    assert load_checkpoint(ws / "checkpoint.pth.tar")["epoch"] == 1
    assert [p.name for p in ws.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_while_tuning_pedconv_paths_is_one_line(signame: str, tmp_path: Path) -> None:
    """Ctrl-C 3 s into 'tuning PEDConv paths' was a 40-line KeyboardInterrupt traceback; SIGTERM exited 143 silently.
    Nothing is trained or written then: one line, 128 + N, no workspace."""
    import signal
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PEDCONV_AUTOTUNE="1", PEDCONV_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    ws = tmp_path / "ws"
    proc = subprocess.Popen([sys.executable, "main.py", "--data-backend", "synthetic", "--arch", "resnet18",
                             "--num-classes", "10", "--image-size", "64", "-b", "8", "--epochs", "1", "--prof", "2",
                             "--training-only", "--no-checkpoints", "--dynamic", "--workspace", str(ws)],
                            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen = ""
        while "tuning PEDConv paths" not in seen:
            line = proc.stderr.readline()
            assert line, seen[-2000:]
            seen += line
        time.sleep(0.5)
        signum = getattr(signal, signame)
        proc.send_signal(signum)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, rest[-2000:]
    assert rest.strip().splitlines()[-1] == (f"main.py: {signame} received while tuning PEDConv paths; nothing trained "
                                             "or written yet, so nothing to save")
    assert "Traceback" not in rest and not ws.exists()


def test_a_checkpoint_that_does_not_fit_is_refused_before_path_tuning(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`--evaluate --pretrained-weights` of a checkpoint for another class count was refused in one line, but after
    93 s of PEDConv path tuning: the weights are loaded first."""
    from image_classification.dynamic import autotune

    ws = tmp_path / "train"
    _ok([*TINY, "--conv", "pedconv", "--epochs", "1", "--no-autotune", "--workspace", str(ws)], capsys)
    tuned = []
    monkeypatch.setattr(autotune, "prepare_model", lambda *a, **k: tuned.append(1))
    monkeypatch.setenv("PEDCONV_AUTOTUNE", "1")
    args = [a if a != "3" else "5" for a in TINY]  # --num-classes 5 against the checkpoint's 3
    code, err = _run([*args, "--evaluate", "--pretrained-weights", str(ws / "checkpoint.pth.tar"),
                      "--workspace", str(tmp_path / "eval")], capsys)
    assert code == 2 and "the checkpoint classifies 3 classes: give --num-classes 3" in _error_line(err)
    assert tuned == [] and "tuning PEDConv paths" not in err


def test_evaluate_resume_auto_prints_no_schedule_note(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--evaluate --resume auto` printed 'note: resuming ... with --epochs 1 -> 90: the learning-rate schedule and the
    optimizer follow the command line', which says nothing about an evaluation."""
    ws = tmp_path / "ws"
    _ok([*TINY, "--epochs", "1", "--no-autotune", "--workspace", str(ws)], capsys)
    err = _ok([*TINY, "--epochs", "90", "--evaluate", "--resume", "auto", "--no-autotune", "--workspace", str(ws)],
              capsys)
    assert "learning-rate schedule" not in err and "--epochs 1 -> 90" not in err


def test_a_signal_during_validation_says_it_waits_for_it(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM during validation: validation ran to its end with nothing saying why the run went on."""
    import signal

    _signal_before(monkeypatch, "validate", signal.SIGTERM)
    ws = tmp_path / "ws"
    code, err = _run([*TINY, "--epochs", "3", "--no-autotune", "--workspace", str(ws)], capsys)
    assert code == 128 + signal.SIGTERM
    assert ("main.py: SIGTERM received during validation: it runs to its end first (its figures cover the whole "
            "set), then the run stops with a checkpoint") in err
    assert load_checkpoint(ws / "checkpoint.pth.tar")["epoch"] == 1


def test_appending_to_another_runs_raport_is_said(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--resume auto` on a workspace with a raport but no checkpoint appended a second run to it with no note."""
    ws = tmp_path / "ws"
    _ok([*TINY, "--epochs", "1", "--no-autotune", "--no-checkpoints", "--workspace", str(ws)], capsys)
    err = _ok([*TINY, "--epochs", "1", "--no-autotune", "--resume", "auto", "--workspace", str(ws)], capsys)
    assert f"main.py: note: {ws / 'raport.json'} already holds records" in err and "is appended after them" in err
    runs = [r for r in read_raport(ws / "raport.json") if r.get("step") == "PARAMETER"]
    assert len(runs) == 2  # both runs' records are kept
