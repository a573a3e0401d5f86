"""The DDP headline command prints no warning: two gloo ranks take a training step of a small network for every
operator and memory format with warnings as errors (tests/training/ddp_step_worker.py). The case that warned:
"Grad strides do not match bucket view strides" for the 1x1 PEDConv layers (their gradient came out with the
strides of a channels_last kernel in an NCHW run), on every rank and every step."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "ddp_step_worker.py"


@pytest.mark.slow
def test_a_ddp_step_of_every_operator_and_memory_format_warns_nothing() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO), PYTHONWARNINGS="error::UserWarning")
    ranks = [subprocess.Popen([sys.executable, str(WORKER)], cwd=REPO, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [rank.communicate(timeout=240)[0] for rank in ranks]
    for rank, out in zip(ranks, outputs):
        assert rank.returncode == 0, out[-3000:]
        # (torch 2.6 adds a ResourceWarning at interpreter exit about a temporary directory of its own)
        assert "UserWarning" not in out and "Grad strides" not in out, out[-3000:]
        assert out.count("step without a warning") == 2 * 8, out[-3000:]
