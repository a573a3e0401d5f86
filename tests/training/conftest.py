"""Fixtures and helpers for the trainer's end-to-end tests: a tiny JPEG ImageFolder and a main.py runner."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest
from PIL import Image
from script_runner import ScriptProcess, run_script, start_script

REPO = Path(__file__).resolve().parents[2]
MAIN = str(REPO / "main.py")

# A tiny static model at 16 px keeps every run to a few seconds on 2 CPU cores.
TINY = ["--arch", "cifar_resnet20", "--image-size", "16", "-b", "4", "-j", "0", "--lr", "0.05", "--seed", "3",
        "-p", "1"]


def write_jpeg_folder(root: Path, classes: Sequence[str] = ("a", "b", "c"), train: int = 4, val: int = 3,
                      size: int = 20, seed: int = 0) -> Path:
    """``root/{train,val}/<class>/<i>.jpg``: class-coloured noisy JPEGs (learnable, 3 classes)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.zeros(3)
                base[label % 3] = 200
                pixels = np.clip(base + rng.integers(-40, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def jpeg_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jpeg_folder(tmp_path_factory.mktemp("data") / "imagenet")


def run_main(args: Sequence[str], timeout: float = 120, env: Optional[Dict[str, str]] = None,
             launcher: Optional[List[str]] = None) -> subprocess.CompletedProcess:
    """``python main.py ARGS`` (or ``python LAUNCHER... main.py ARGS``) from the repo root, in a process of its own
    forked with torch already imported (tests/script_runner.py); text output, like ``subprocess.run``."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    full_env.pop("WORLD_SIZE", None)
    target, rest = (launcher[0], [*launcher[1:], MAIN]) if launcher else (MAIN, [])
    return run_script(target, [*rest, *args], env=full_env, cwd=REPO, timeout=timeout)


def launch_ranks(per_rank: Sequence[Sequence[str]]) -> List[ScriptProcess]:
    """Start one ``main.py`` per rank by hand, as torchrun would (rank 0 hosts the rendezvous store on a free
    port), each in a process of its own forked by tests/script_runner.py; ``per_rank[r]`` is rank r's argv."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    base = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        base.pop(name, None)
    return [start_script(MAIN, list(args), cwd=REPO,
                         env=dict(base, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(len(per_rank)),
                                  RANK=str(rank), LOCAL_RANK=str(rank)))
            for rank, args in enumerate(per_rank)]


def snapshot(path: Path) -> Dict[str, float]:
    """Every file under ``path`` with its mtime (to check that a failed run changed nothing)."""
    return {str(p): p.stat().st_mtime for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="session")
def e2e() -> SimpleNamespace:
    """The helpers above for test modules (conftest itself is not importable under a unique name)."""
    return SimpleNamespace(run=run_main, launch_ranks=launch_ranks, tiny=tuple(TINY), main=MAIN, repo=REPO,
                           snapshot=snapshot)
