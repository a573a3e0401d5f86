"""Checkpoint I/O: atomic writes, model_best/gathered copies, load errors, weight loading, RNG, signals."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from image_classification.dynamic import build_conv
from image_classification.dynamic.pedconv import convert_authors_state_dict
from image_classification.models import build_model
from image_classification.training.checkpoint import (
    CheckpointError,
    GracefulShutdown,
    check_workspace_writable,
    load_checkpoint,
    load_model_weights,
    recorded_args,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

REPO = Path(__file__).resolve().parents[3]


def test_recorded_args_reads_a_checkpoints_arguments_and_nothing_else() -> None:
    """The training arguments a checkpoint recorded; {} for a raw state dict or a malformed field."""
    assert recorded_args({"args": {"seed": 3, "dataset": "cifar10"}, "epoch": 1}) == {"seed": 3, "dataset": "cifar10"}
    assert recorded_args({"fc.weight": torch.zeros(2, 2)}) == {}
    assert recorded_args({"args": "--seed 3"}) == {}
    assert recorded_args({"args": None}) == {}


def tiny_model(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes)
    )


def full_state(model: nn.Module, epoch: int) -> dict:
    """A state shaped like the trainer's: everything --resume restores."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    ema = torch.optim.swa_utils.AveragedModel(model)
    loss = model(torch.randn(2, 3, 8, 8)).sum()
    loss.backward()
    optimizer.step()
    scheduler.step()
    ema.update_parameters(model)
    scaler = torch.amp.GradScaler("cuda", enabled=False) if hasattr(torch, "amp") else None
    return {
        "epoch": epoch,
        "arch": "resnet18",
        "conv": "static",
        "placement": "paper",
        "num_classes": 5,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "ema": ema.state_dict(),
        "best_prec1": np.float64(12.5),  # numpy scalars are converted on save
        "rng": rng_state(),
    }


def leftovers(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def assert_one_line_naming(exc: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


# ------------------------------------------------------------------------------------ saving


def test_roundtrip_is_weights_only_loadable(tmp_path: Path) -> None:
    model = tiny_model()
    state = full_state(model, epoch=3)
    path = save_checkpoint(state, tmp_path)
    assert path == tmp_path / "checkpoint.pth.tar"
    raw = torch.load(path, map_location="cpu", weights_only=True)  # the strict loader accepts all of it
    assert raw["best_prec1"] == 12.5 and type(raw["best_prec1"]) is float
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["conv"] == "static"
    for key, value in state["state_dict"].items():
        assert torch.equal(loaded["state_dict"][key], value)
    assert loaded["state_dict"]._metadata == state["state_dict"]._metadata  # module versions survive
    fresh = tiny_model()
    optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    optimizer.load_state_dict(loaded["optimizer"])
    ema = torch.optim.swa_utils.AveragedModel(fresh)
    ema.load_state_dict(loaded["ema"])
    assert int(ema.n_averaged) == 1
    assert leftovers(tmp_path) == []


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    save_checkpoint({"epoch": 1, "state_dict": model.state_dict()}, tmp_path, is_best=True)
    before = (tmp_path / "checkpoint.pth.tar").read_bytes()
    real_save = torch.save

    def dying_save(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.flush()
        handle.truncate(handle.tell() // 2)  # half a file written, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(CheckpointError) as exc:
        save_checkpoint({"epoch": 2, "state_dict": model.state_dict()}, tmp_path, is_best=True)
    assert_one_line_naming(exc, "checkpoint.pth.tar", "No space left on device")
    assert (tmp_path / "checkpoint.pth.tar").read_bytes() == before
    assert load_checkpoint(tmp_path / "model_best.pth.tar")["epoch"] == 1
    assert leftovers(tmp_path) == []

    def interrupted_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2, "state_dict": model.state_dict()}, tmp_path)
    assert (tmp_path / "checkpoint.pth.tar").read_bytes() == before
    assert leftovers(tmp_path) == []


def test_failed_best_copy_keeps_previous_best(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model()
    save_checkpoint({"epoch": 1, "state_dict": model.state_dict()}, tmp_path, is_best=True)

    def dying_copy(src, dst, *args, **kwargs):
        Path(dst).write_bytes(Path(src).read_bytes()[:10])
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(shutil, "copyfile", dying_copy)
    with pytest.raises(CheckpointError) as exc:
        save_checkpoint({"epoch": 2, "state_dict": model.state_dict()}, tmp_path, is_best=True)
    assert_one_line_naming(exc, "model_best.pth.tar", "Input/output error")
    assert load_checkpoint(tmp_path / "model_best.pth.tar")["epoch"] == 1
    assert load_checkpoint(tmp_path / "checkpoint.pth.tar")["epoch"] == 2  # the main write had completed
    assert leftovers(tmp_path) == []


def test_model_best_only_when_best(tmp_path: Path) -> None:
    model = tiny_model()
    save_checkpoint({"epoch": 1, "state_dict": model.state_dict()}, tmp_path, is_best=True)
    save_checkpoint({"epoch": 2, "state_dict": model.state_dict()}, tmp_path, is_best=False)
    assert load_checkpoint(tmp_path / "checkpoint.pth.tar")["epoch"] == 2
    assert load_checkpoint(tmp_path / "model_best.pth.tar")["epoch"] == 1
    save_checkpoint({"epoch": 3, "state_dict": model.state_dict()}, tmp_path, is_best=True)
    assert load_checkpoint(tmp_path / "model_best.pth.tar")["epoch"] == 3
    best, last = tmp_path / "model_best.pth.tar", tmp_path / "checkpoint.pth.tar"
    assert best.read_bytes() == last.read_bytes() and not os.path.samefile(best, last)


def test_gather_keeps_last_n(tmp_path: Path) -> None:
    model = tiny_model()
    for epoch in range(1, 6):
        save_checkpoint({"epoch": epoch, "state_dict": model.state_dict()}, tmp_path, "run.pth.tar", gather=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["run-0004.pth.tar", "run-0005.pth.tar", "run.pth.tar"]
    assert load_checkpoint(tmp_path / "run-0004.pth.tar")["epoch"] == 4
    # resumed from epoch 2: copies of the abandoned later epochs are left alone, the new one is kept
    save_checkpoint({"epoch": 3, "state_dict": model.state_dict()}, tmp_path, "run.pth.tar", gather=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["run-0003.pth.tar", "run-0004.pth.tar", "run-0005.pth.tar", "run.pth.tar"]
    assert load_checkpoint(tmp_path / "run-0004.pth.tar")["epoch"] == 4
    assert load_checkpoint(tmp_path / "run-0003.pth.tar")["epoch"] == 3


@pytest.mark.parametrize(
    "state, kwargs, needle",
    [
        ({"state_dict": {}}, {"gather": 2}, "state['epoch']"),
        ({"epoch": 1, "state_dict": {}, "hook": object()}, {}, "state['hook']"),
        ({"epoch": 1, "state_dict": {}}, {"filename": "../escape.pth"}, "../escape.pth"),
        ({"epoch": 1, "state_dict": {}}, {"gather": -1}, "gather"),
        ([1, 2], {}, "list"),
    ],
)
def test_bad_save_requests(tmp_path: Path, state, kwargs, needle: str) -> None:
    with pytest.raises(CheckpointError) as exc:
        save_checkpoint(state, tmp_path, **kwargs)
    assert_one_line_naming(exc, needle)
    assert list(tmp_path.iterdir()) == []


def test_save_converts_plain_data(tmp_path: Path) -> None:
    state = {"epoch": 1, "state_dict": {}, "args": argparse.Namespace(lr=0.1, data=Path("/data")),
             "hist": np.arange(3)}
    load = load_checkpoint(save_checkpoint(state, tmp_path))
    assert load["args"] == {"lr": 0.1, "data": "/data"}
    assert torch.equal(load["hist"], torch.arange(3))


# ------------------------------------------------------------------------------------ loading


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    model = tiny_model()
    good = save_checkpoint({"epoch": 1, "state_dict": model.state_dict()}, tmp_path)
    data = good.read_bytes()
    cases = {
        "truncated.pth.tar": data[: len(data) // 2],
        "truncated-tail.pth.tar": data[:-20],
        "garbage.pth.tar": os.urandom(4096),
        "text.pth.tar": b"this is not a checkpoint\n" * 10,
        "empty.pth.tar": b"",
    }
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(CheckpointError) as exc:
            load_checkpoint(tmp_path / name)
        assert_one_line_naming(exc, str(tmp_path / name))
        assert "corrupt" in str(exc.value)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "absent.pth.tar")
    assert_one_line_naming(exc, "not found", str(tmp_path / "absent.pth.tar"))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path)
    assert_one_line_naming(exc, "directory")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "list.pth")
    assert_one_line_naming(exc, "list.pth", "not a dict")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nosd.pth")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "nosd.pth")
    assert_one_line_naming(exc, "nosd.pth", "no 'state_dict'", "epoch")


class _Payload:
    """Stands for an arbitrary pickled object, which weights_only loading must refuse."""


def test_foreign_objects_refused_unless_trusted(tmp_path: Path) -> None:
    torch.save({"state_dict": tiny_model().state_dict(), "extra": _Payload()}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "foreign.pth")
    assert_one_line_naming(exc, "foreign.pth", "_Payload", "trusted=True")
    assert isinstance(load_checkpoint(tmp_path / "foreign.pth", trusted=True)["extra"], _Payload)


def test_a_programs_trust_flag_is_the_default_of_every_load(tmp_path: Path) -> None:
    from image_classification.training.checkpoint import trust_checkpoints

    torch.save({"state_dict": tiny_model().state_dict(), "extra": _Payload()}, tmp_path / "foreign.pth")
    try:
        trust_checkpoints(True)
        assert isinstance(load_checkpoint(tmp_path / "foreign.pth")["extra"], _Payload)
        with pytest.raises(CheckpointError):
            load_checkpoint(tmp_path / "foreign.pth", trusted=False)
    finally:
        trust_checkpoints(False)
    with pytest.raises(CheckpointError, match="--trust-checkpoints"):
        load_checkpoint(tmp_path / "foreign.pth")



@pytest.mark.skipif(
    not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"), reason="torch < 2.5 cannot list globals"
)
def test_numpy_and_namespace_from_older_trainers_load(tmp_path: Path) -> None:
    legacy = {"state_dict": tiny_model().state_dict(), "best_prec1": np.float64(74.1),
              "hist": np.zeros(3, dtype=np.float32), "args": argparse.Namespace(arch="resnet18")}
    torch.save(legacy, tmp_path / "dle.pth.tar")
    loaded = load_checkpoint(tmp_path / "dle.pth.tar")
    assert float(loaded["best_prec1"]) == pytest.approx(74.1) and loaded["args"].arch == "resnet18"


def test_raw_and_legacy_format_state_dicts(tmp_path: Path) -> None:
    model = tiny_model()
    torch.save(model.state_dict(), tmp_path / "raw.pth")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("raw.pth", "legacy.pth"):
        target = tiny_model(5)
        nn.init.zeros_(target[4].weight)
        load_model_weights(target, tmp_path / name)
        assert torch.equal(target[4].weight, model[4].weight)


# ------------------------------------------------------------------------------------ weights into models


def test_arch_and_operator_mismatch_named(tmp_path: Path) -> None:
    model = tiny_model()
    path = save_checkpoint({"epoch": 1, "arch": "resnet50", "conv": "static", "state_dict": model.state_dict()},
                           tmp_path)
    with pytest.raises(CheckpointError) as exc:
        load_model_weights(tiny_model(), path, expected_arch="resnet18", expected_conv="static")
    assert_one_line_naming(exc, str(path), "arch resnet50", "model is arch resnet18", "mismatching: arch")
    with pytest.raises(CheckpointError) as exc:
        load_model_weights(tiny_model(), path, expected_arch="resnet50", expected_conv="dcd:blocks=2")
    assert_one_line_naming(exc, "operator static", "operator dcd:blocks=2", "mismatching: conv")
    returned = load_model_weights(tiny_model(), path, expected_arch="resnet50", expected_conv="static")
    assert returned["arch"] == "resnet50"


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_stripped(prefix: str) -> None:
    source = tiny_model()
    state = {prefix + k: v for k, v in source.state_dict().items()}
    target = tiny_model()
    nn.init.zeros_(target[0].weight)
    load_model_weights(target, {"state_dict": state, "arch": "x"})
    assert torch.equal(target[0].weight, source[0].weight)


def test_ema_state_and_wrapped_targets() -> None:
    source = tiny_model()
    ema = torch.optim.swa_utils.AveragedModel(source)
    with torch.no_grad():
        source[4].weight.add_(1.0)
    ema.update_parameters(source)
    expected = ema.module[4].weight.detach().clone()
    for wrap in (lambda m: m, nn.DataParallel, torch.optim.swa_utils.AveragedModel):
        target = wrap(tiny_model())
        load_model_weights(target, {"state_dict": ema.state_dict()})
        inner = target.module if hasattr(target, "module") else target
        assert torch.equal(inner[4].weight, expected)
    compiled = torch.compile(tiny_model()) if hasattr(torch, "compile") else None
    if compiled is not None:  # compile is lazy: nothing is compiled until a forward
        load_model_weights(compiled, {"state_dict": source.state_dict()})
        assert torch.equal(compiled._orig_mod[4].weight, source[4].weight)


def test_key_mismatch_lists_keys_and_counts() -> None:
    source = nn.Sequential(*[nn.Linear(2, 2) for _ in range(8)])
    target = nn.Sequential(*[nn.Linear(2, 2) for _ in range(2)], nn.Linear(2, 3))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as exc:
        load_model_weights(target, {"state_dict": source.state_dict()})
    message = str(exc.value)
    assert_one_line_naming(exc, "10 unexpected", "3.weight", "... 5 more", "2 shape mismatches",
                           "2.weight: checkpoint [2, 2] vs model [3, 2]")
    assert "missing" not in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # untouched on failure

    small = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(CheckpointError) as exc:
        load_model_weights(target, {"state_dict": small.state_dict()})
    assert_one_line_naming(exc, "4 missing", "1.weight", "2.bias")
    load_model_weights(target, {"state_dict": small.state_dict()}, strict=False)
    assert torch.equal(target[0].weight, small[0].weight)
    with pytest.raises(CheckpointError) as exc:  # strict=False never hides a shape mismatch
        load_model_weights(nn.Sequential(nn.Linear(2, 5)), {"state_dict": small.state_dict()}, strict=False)
    assert_one_line_naming(exc, "2 shape mismatches", "0.weight: checkpoint [2, 2] vs model [5, 2]",
                           "(the checkpoint classifies 2 classes: give --num-classes 2)")  # only the classifier differs
    conv_first = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(CheckpointError) as exc:
        load_model_weights(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4, 2)),
                           {"state_dict": conv_first.state_dict()})
    assert_one_line_naming(exc, "0.weight: checkpoint [4, 3, 3, 3] vs model [4, 3, 1, 1]",
                           "(the checkpoint's layers have other shapes: check --arch, --conv and --placement")


# ------------------------------------------------------------------------------------ authors' layout


def _authors_pedconv_state(prefix: str, c_in: int, c_out: int, k: int, hidden: int, gen: torch.Generator) -> dict:
    """A dynamic layer in the layout of the authors' released code (PEDConv repository), random values."""
    shapes = {
        "weight": (c_out, c_in, k, k),
        "attn.fc_share.weight": (hidden, c_in), "attn.fc_share.bias": (hidden,),
        "attn.fc_inp.weight": (c_in, hidden), "attn.fc_inp.bias": (c_in,),
        "attn.fc_oup.weight": (c_out, hidden), "attn.fc_oup.bias": (c_out,),
        "attn.fc_k.weight": (k * k, hidden), "attn.fc_k.bias": (k * k,),
        "attn.decoder.0.weight": (hidden, c_in + c_out + k * k), "attn.decoder.0.bias": (hidden,),
        "attn.decoder.2.weight": (c_in, hidden), "attn.decoder.2.bias": (c_in,),
    }
    return {f"{prefix}{name}": torch.randn(shape, generator=gen) * 0.5 for name, shape in shapes.items()}


def test_authors_layout_converted_on_load(tmp_path: Path) -> None:
    """The loader recognises the authors' layout, refuses it for a static model (naming it) and loads it through
    convert_authors_state_dict (whose exactness tests/dynamic/pedconv/test_pedconv_authors_layout.py checks)."""
    c_in, c_out, k = 64, 16, 3  # C_in / 16 = 4 = the smallest bottleneck PEDConv builds
    model = nn.Sequential()
    model.add_module("conv1", build_conv("pedconv", c_in, c_out, k, padding=1, bias=False))
    hidden = c_in // 16  # the authors' generator bottleneck C_in/16
    gen = torch.Generator().manual_seed(1)
    authors = _authors_pedconv_state("module.conv1.", c_in, c_out, k, hidden, gen)
    torch.save({"epoch": 250, "arch": "resnet18", "best_prec1": 74.1, "state_dict": authors}, tmp_path / "rel.pth")

    with pytest.raises(CheckpointError) as exc:
        load_model_weights(model, tmp_path / "rel.pth", expected_arch="resnet18", expected_conv="static")
    assert_one_line_naming(exc, "authors' PEDConv layout", "static")

    load_model_weights(model, tmp_path / "rel.pth", expected_arch="resnet18", expected_conv="pedconv")
    converted = convert_authors_state_dict({key.removeprefix("module."): v for key, v in authors.items()})
    state = model.state_dict()
    for key, value in converted.items():
        assert torch.equal(state[key], value), key


# ------------------------------------------------------------------------------------ RNG


def _draws() -> tuple:
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.standard_normal(3).tolist() + np.random.randint(0, 1000, 3).tolist(),
        torch.randn(4).tolist() + torch.randint(0, 1000, (3,)).tolist(),
    )


def test_rng_round_trip_through_checkpoint(tmp_path: Path) -> None:
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    random.gauss(0, 1)  # leaves a cached gaussian in python's generator
    np.random.standard_normal(1)  # and in numpy's
    path = save_checkpoint({"epoch": 1, "state_dict": {}, "rng": rng_state()}, tmp_path)
    expected = _draws()
    _draws()  # move every generator on
    set_rng_state(torch.load(path, map_location="cpu", weights_only=True)["rng"])
    assert _draws() == expected
    with pytest.raises(CheckpointError) as exc:
        set_rng_state({"python": {"version": 3}})
    assert_one_line_naming(exc, "RNG state")


# ------------------------------------------------------------------------------------ signals


def _wait_for(predicate, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_graceful_shutdown_flag_and_restore() -> None:
    before_term, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with GracefulShutdown() as shutdown:
        assert shutdown.active and not shutdown.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: shutdown.requested)
        assert shutdown.signum == signal.SIGTERM and shutdown.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before_term and signal.getsignal(signal.SIGINT) is before_int



def test_graceful_shutdown_outside_main_thread_is_inert() -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def worker() -> None:
        with GracefulShutdown() as shutdown:
            seen["active"] = shutdown.active
            shutdown.request()
            seen["requested"] = shutdown.requested

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"active": False, "requested": True}
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signal semantics")
def test_sigterms_however_many_ask_for_the_save() -> None:
    """Two SIGTERMs 50 ms apart (SLURM signals every task at preemption and train.sbatch forwards one more) stopped
    the process at once with no checkpoint; now each further SIGTERM is a line and the save still happens."""
    code = textwrap.dedent(
        """
        import os, signal, sys, time
        from image_classification.training.checkpoint import GracefulShutdown
        with GracefulShutdown(program="prog") as shutdown:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            assert shutdown.requested and shutdown.signum == signal.SIGTERM
            with shutdown.saving():
                print("saved", flush=True)
        print("survived", flush=True)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.split() == ["saved", "survived"], proc.stderr
    assert proc.stderr.splitlines() == ["prog: SIGTERM again: still stopping after saving a checkpoint (a SIGTERM "
                                        "always asks for the save; a second Ctrl-C or SIGKILL stops at once, losing "
                                        "the progress since the last checkpoint)"] * 2


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signal semantics")
@pytest.mark.parametrize("signum", [signal.SIGINT])
def test_a_second_signal_stops_at_once_in_one_line_but_waits_for_a_checkpoint_being_written(signum: int) -> None:
    """Outside a save a second Ctrl-C exits with 128 + N and one line (SIGINT twice gave a KeyboardInterrupt
    traceback); inside ``saving()`` the write is finished first, each further signal saying so, and the process
    exits only after it (a second signal there left a 0-byte temporary and no checkpoint)."""
    code = textwrap.dedent(
        f"""
        import os, signal, sys, time
        from image_classification.training.checkpoint import GracefulShutdown
        with GracefulShutdown(program="prog") as shutdown:
            os.kill(os.getpid(), {int(signum)})
            while not shutdown.requested:
                time.sleep(0.01)
            with shutdown.saving():
                os.kill(os.getpid(), {int(signum)})
                time.sleep(0.2)
                print("saved", flush=True)
            os.kill(os.getpid(), {int(signum)})
            time.sleep(10)
        print("survived", flush=True)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum and proc.stdout.split() == ["saved"], proc.stderr
    assert proc.stderr.splitlines() == [
        f"prog: {name} again while the checkpoint is written: stopping once it is complete (SIGKILL stops at once, "
        "losing it)", f"prog: second {name}: stopping now without saving (the last checkpoint on disk is intact; "
        "the progress since it is lost)"]


# ------------------------------------------------------------------------------------ workspace


def test_check_workspace_writable(tmp_path: Path) -> None:
    created = check_workspace_writable(tmp_path / "a" / "b")
    assert created.is_dir() and list(created.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError) as exc:
        check_workspace_writable(blocker)
    assert_one_line_naming(exc, str(blocker), "not a directory")
    with pytest.raises(CheckpointError) as exc:
        check_workspace_writable(blocker / "sub")
    assert_one_line_naming(exc, str(blocker / "sub"), "cannot be created")
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        try:
            with pytest.raises(CheckpointError) as exc:
                check_workspace_writable(locked)
            assert_one_line_naming(exc, str(locked), "not writable")
        finally:
            locked.chmod(0o700)



def test_authors_release_layout_loads_into_resnet18(tmp_path: Path) -> None:
    """The --evaluate --pretrained-weights path: every name of the released ResNet-18 finds its place."""
    gen = torch.Generator().manual_seed(2)
    released = {}
    for key, value in torchvision.models.resnet18(weights=None).state_dict().items():
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        if layer and ".conv" in layer and layer.startswith("layer"):  # every conv inside a residual block
            c_out, c_in, k, _ = value.shape
            released.update(_authors_pedconv_state(f"module.{layer}.", c_in, c_out, k, c_in // 16, gen))
        else:
            released[f"module.{key}"] = value
    torch.save({"epoch": 250, "arch": "resnet18", "best_prec1": 74.1, "state_dict": released}, tmp_path / "rel.pth")

    model = build_model("resnet18", conv="pedconv", placement="paper", num_classes=1000)
    load_model_weights(model, tmp_path / "rel.pth", expected_arch="resnet18", expected_conv="pedconv")
    state = model.state_dict()
    for ours, theirs in [("layer4.1.conv2.generator.heads.0.fc_psi.weight", "layer4.1.conv2.attn.fc_k.weight"),
                         ("layer2.0.conv1.weight", "layer2.0.conv1.weight"),
                         ("layer3.0.downsample.0.weight", "layer3.0.downsample.0.weight"),
                         ("fc.bias", "fc.bias")]:
        assert torch.equal(state[ours], released[f"module.{theirs}"]), ours


def test_stale_temporaries_of_killed_writers_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".checkpoint.pth.tar.k1ll3d_x.tmp"
    stale_best = tmp_path / ".model_best.pth.tar.abc123de.tmp"
    recent = tmp_path / ".checkpoint.pth.tar.w0rk1ng_.tmp"
    foreign = tmp_path / ".notes.txt.abcdefgh.tmp"
    for path in (stale, stale_best, recent, foreign):
        path.write_bytes(b"partial")
    old = time.time() - 2 * 3600
    for path in (stale, stale_best, foreign):
        os.utime(path, (old, old))
    save_checkpoint({"epoch": 1, "state_dict": {}}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([recent.name, foreign.name, "checkpoint.pth.tar"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_and_cuda_tensors_round_trip(tmp_path: Path) -> None:
    torch.cuda.manual_seed_all(7)
    model = tiny_model().cuda()
    path = save_checkpoint({"epoch": 1, "state_dict": model.state_dict(), "rng": rng_state()}, tmp_path)
    expected = torch.randn(5, device="cuda").tolist()
    torch.randn(5, device="cuda")
    loaded = load_checkpoint(path)  # map_location="cpu": CUDA tensors come back on the CPU
    assert all(t.device.type == "cpu" for t in loaded["state_dict"].values())
    set_rng_state(loaded["rng"])
    assert torch.randn(5, device="cuda").tolist() == expected
    load_model_weights(tiny_model().cuda(), loaded)


@pytest.mark.parametrize("message,said", [("main.py: {signal} received while compiling", "main.py: SIGTERM received "
                                                                                          "while compiling\n"),
                                          ("", "")])
def test_nothing_to_save_exits_from_the_handler_without_unwinding(message: str, said: str) -> None:
    """Around foreign code (torch.compile) the handler exits at once with 128 + signum, printing the message: an
    exception raised there could cross a C++ frame and abort the process instead (a flaky SIGTERM-while-compiling
    run ended in "terminate called after throwing an instance of 'python_error'", status -6)."""
    code = ("import os, signal, time\n"
            "from image_classification.training.checkpoint import GracefulShutdown\n"
            "with GracefulShutdown() as shutdown:\n"
            f"    with shutdown.nothing_to_save(exit_message={message!r}):\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        time.sleep(10)\n"
            "print('not reached')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM and done.stderr == said and done.stdout == ""
