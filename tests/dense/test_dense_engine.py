"""The iteration-based training loop on a toy regression task: loss, checkpoints, resume, signals, NaN."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from image_classification.data import DataError
from image_classification.dense.engine import (
    Task,
    TaskLoader,
    add_common_flags,
    run_cli,
    train,
)
from image_classification.training.checkpoint import load_checkpoint
from image_classification.training.distributed import DistEnv
from image_classification.training.engine import NonFiniteLossError
from image_classification.training.logger import raport_values, read_raport

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
DEFAULTS = dict(batch_size=4, iterations=10, lr=0.1, lr_schedule="step", weight_decay=0.0, workspace="ws",
                eval_every=0, save_every=0)


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_common_flags(parser, DEFAULTS)
    return parser.parse_args(["data", "--workspace", str(tmp_path / "ws"), "-j", "0", "-p", "1", *extra])


def _setup(seed: int = 0):
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    torch.manual_seed(seed)
    model = nn.Linear(4, 1)
    data = TensorDataset(x, y)
    calls: List[int] = []

    def losses(net: nn.Module, batch: Any, device: torch.device) -> Dict[str, torch.Tensor]:
        calls.append(1)
        xb, yb = batch
        return {"mse": ((net(xb).squeeze(1) - yb) ** 2).mean()}

    def evaluate(net: nn.Module, loader: Any, device: torch.device) -> Dict[str, float]:
        with torch.no_grad():
            return {"val.score": -float(((net(x).squeeze(1) - y) ** 2).mean())}

    task = Task("toy", "toy", losses, evaluate, "val.score", {"arch": "linear", "conv": "static"})
    return model, data, task, calls


def test_trains_checkpoints_and_resumes_exactly(tmp_path: Path) -> None:
    model, data, task, _ = _setup()
    args = _args(tmp_path, "--iterations", "8", "--eval-every", "4", "--lr", "0.01")
    loader = TaskLoader(data, 4, True, 0, ENV, seed=0)
    assert train(args, task, model, loader, [None], ENV) == 0
    records = read_raport(tmp_path / "ws" / "raport.json")
    losses = [v for _, v in raport_values(records, "train.loss")]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2]) / 4
    assert [s for s, _ in raport_values(records, "val.score")] == [[4], [8]]
    assert raport_values(records, "summary.best_score")
    full = load_checkpoint(tmp_path / "ws" / "checkpoint.pth.tar")
    assert full["iteration"] == 8 and (tmp_path / "ws" / "model_best.pth.tar").is_file()

    # the same run in two halves ends with the same weights (data order, optimizer, schedule, RNG restored)
    model2, data2, task2, _ = _setup()
    split = tmp_path / "split"
    args = _args(split, "--iterations", "4", "--lr", "0.01", "--no-eval")
    assert train(args, task2, model2, TaskLoader(data2, 4, True, 0, ENV, seed=0), None, ENV) == 0
    model3, data3, task3, _ = _setup(seed=5)  # other initial weights: the checkpoint must replace them
    args = _args(split, "--iterations", "8", "--lr", "0.01", "--no-eval", "--resume", "auto")
    assert train(args, task3, model3, TaskLoader(data3, 4, True, 0, ENV, seed=0), None, ENV) == 0
    torch.testing.assert_close(model3.state_dict(), full["state_dict"])


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path: Path) -> None:
    model, data, task, calls = _setup()
    inner = task.losses

    def losses(net, batch, device):
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return inner(net, batch, device)

    task.losses = losses
    args = _args(tmp_path, "--iterations", "10", "--no-eval")
    assert train(args, task, model, TaskLoader(data, 4, True, 0, ENV, seed=0), None, ENV) == 128 + signal.SIGTERM
    assert load_checkpoint(tmp_path / "ws" / "checkpoint.pth.tar")["iteration"] == 3


def test_non_finite_loss_stops_with_one_line_and_keeps_the_checkpoint(tmp_path: Path, capsys) -> None:
    model, data, task, calls = _setup()
    inner = task.losses

    def losses(net, batch, device):
        out = inner(net, batch, device)
        return {"mse": out["mse"] * float("nan")} if len(calls) > 3 else out

    task.losses = losses
    args = _args(tmp_path, "--iterations", "10", "--no-eval", "--save-every", "2")

    def body() -> int:
        return train(args, task, model, TaskLoader(data, 4, True, 0, ENV, seed=0), None, ENV)

    with pytest.raises(NonFiniteLossError, match="loss is nan at iteration 4"):
        body()
    assert run_cli("toy", body) == 3  # main.py's status for a diverged run
    assert "toy: error: loss is nan" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "ws" / "checkpoint.pth.tar")["iteration"] == 2


def test_resume_refuses_another_tasks_checkpoint(tmp_path: Path, capsys) -> None:
    model, data, task, _ = _setup()
    assert train(_args(tmp_path, "--iterations", "1", "--no-eval"), task, model,
                 TaskLoader(data, 4, True, 0, ENV, seed=0), None, ENV) == 0
    task.checkpoint_fields = {"arch": "other", "conv": "static"}

    def body() -> int:
        return train(_args(tmp_path, "--iterations", "2", "--resume", "auto"), task, model,
                     TaskLoader(data, 4, True, 0, ENV, seed=0), None, ENV)

    assert run_cli("toy", body) == 2
    assert "is for arch 'linear', this run has 'other'" in capsys.readouterr().err


@pytest.mark.parametrize("error,status,line", [
    (lambda: NonFiniteLossError("loss is nan at iteration 3"), 3, "loss is nan at iteration 3"),
    (lambda: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1228800000000 bytes."),
     2, "out of memory: the machine cannot allocate 1144.4 GiB for this run; lower -b"),
    (lambda: DataError("no images in /x"), 2, "no images in /x"),
])
def test_dense_tasks_exit_as_main_py_does(capsys: pytest.CaptureFixture, error, status: int, line: str) -> None:
    """One exit policy (training/exit_status.py): the same failure ends with the same status and line in the
    dense tasks' loop as in main.py's."""
    from image_classification.training.exit_status import expected_failure

    def body() -> int:
        raise error()

    assert run_cli("toy", body) == status
    assert capsys.readouterr().err.startswith(f"toy: error: {line}")
    failure = expected_failure(error())
    assert failure is not None and failure.status == status and failure.message.startswith(line)


def test_an_unexpected_error_keeps_its_traceback() -> None:
    def body() -> int:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_cli("toy", body)
