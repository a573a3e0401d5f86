"""Process-group helpers without a launcher, and multiproc.py's translation to torchrun arguments."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from image_classification.training.distributed import (
    all_reduce_sum,
    any_rank,
    broadcast_int,
    init_distributed,
)

REPO = Path(__file__).resolve().parents[2]


def _multiproc():
    spec = importlib.util.spec_from_file_location("multiproc", REPO / "multiproc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_single_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = init_distributed("cpu")
    assert (env.rank, env.world_size, env.is_main, env.distributed) == (0, 1, True, False)
    assert env.device == torch.device("cpu")
    assert all_reduce_sum([1.5, 2], env.device) == [1.5, 2.0]
    assert any_rank(True, env.device) and not any_rank(False, env.device)
    assert broadcast_int(7, env.device) == 7


def test_cuda_request_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        init_distributed("cuda")


def test_multiproc_single_node_is_standalone() -> None:
    mp = _multiproc()
    args = mp.build_parser().parse_args(["--nproc_per_node", "8", "./main.py", "/data", "-b", "64", "--dynamic"])
    assert mp.torchrun_args(args) == ["--nnodes", "1", "--nproc_per_node", "8", "--standalone", "./main.py", "/data",
                                      "-b", "64", "--dynamic"]


def test_multiproc_multi_node() -> None:
    mp = _multiproc()
    args = mp.build_parser().parse_args(["--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "4",
                                         "--master_addr", "10.0.0.1", "--master_port", "1234", "main.py", "D"])
    assert mp.torchrun_args(args) == ["--nnodes", "2", "--nproc_per_node", "4", "--node_rank", "1", "--master_addr",
                                      "10.0.0.1", "--master_port", "1234", "main.py", "D"]


@pytest.mark.parametrize("argv, needle", [(["--nnodes", "2", "main.py"], "--master_addr is required"),
                                          (["--nnodes", "2", "--node_rank", "2", "--master_addr", "h", "main.py"],
                                           "--node_rank 2"),
                                          # each worker failed, then torchrun's multi-line failure report
                                          (["--nproc_per_node", "2", "missing_script.py"],
                                           "training script missing_script.py not found")])
def test_multiproc_bad_arguments(capsys: pytest.CaptureFixture, argv: list, needle: str) -> None:
    mp = _multiproc()
    with pytest.raises(SystemExit) as info:
        mp.main(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_multiproc_exit_status_is_the_root_cause() -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    mp = _multiproc()

    def failure(rank: int, code: int, when: int) -> ProcessFailure:
        item = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="/nonexistent")
        item.timestamp = when
        return item

    def status(*items: ProcessFailure) -> int:
        return mp.exit_status(ChildFailedError("main.py", {f.local_rank: f for f in items}))

    assert status(failure(0, 1, 10), failure(1, 2, 9)) == 2  # rank 1's bad input, not rank 0's "lost peer"
    assert status(failure(0, 1, 9), failure(1, -9, 9)) == 137  # SIGKILL (OOM killer), as a shell reports it
    assert status(failure(0, 3, 5)) == 3


def test_peer_failure_messages_are_recognised() -> None:
    from image_classification.training.rank_health import is_peer_failure

    for message in ("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms "
                    "for recv operation to complete",
                    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242",
                    "NCCL communicator was aborted on rank 0.",
                    "Application timeout caused pair closure"):  # gloo's broadcast when a frozen peer times out
        assert is_peer_failure(RuntimeError(message)), message
    assert not is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not is_peer_failure(ValueError("Connection closed by peer"))


def test_multiproc_with_its_port_in_use_is_one_line(capsys: pytest.CaptureFixture) -> None:
    """The rendezvous store cannot listen on a taken --master_port: one line naming the port, exit 2 (no worker
    starts, so the command after it never runs)."""
    import socket

    mp = _multiproc()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as info:
            mp.main(["--nproc_per_node", "1", "--master_port", str(port), "main.py"])  # a script that exists
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"multiproc.py: error: port {port} on 127.0.0.1 is in use (another job on this "
                                    "node?): give another --master_port")


def test_cleanup_tears_down_together_only_when_every_rank_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    """A barrier before destroy_process_group when every rank reaches it the same way (gloo on torch 2.6 blocked for
    ever in destroy now and then when a peer had already gone); none after a failure, where a peer may be inside
    another collective."""
    from image_classification.training import distributed

    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(distributed.dist, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda *a: calls.append("destroy"))
    distributed.cleanup(all_ranks_here=True)
    assert calls == ["barrier", "destroy"]
    calls.clear()
    distributed.cleanup()
    assert calls == ["destroy"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_that_never_comes_is_named(rank: int, tmp_path: Path) -> None:
    """With one of two ranks started, main.py waited silently (600 s by default) and ended in a 28-line
    DistStoreError ('1/2 clients joined'). Rank 0 now says within seconds whom it waits for and names the missing
    rank at --dist-timeout; a rank without a rank 0 says where it looked. One line each, exit 2, nothing written."""
    import os
    import subprocess
    import sys
    import time

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC"))}
    env.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    args = [sys.executable, "main.py", "--data-backend", "synthetic", "--arch", "cifar_resnet20", "--num-classes", "10",
            "--image-size", "16", "-b", "4", "--no-autotune", "--epochs", "1", "--prof", "1", "--training-only",
            "--no-checkpoints", "--workspace", str(tmp_path / "ws"), "--dist-timeout", "5"]
    started = time.monotonic()
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and time.monotonic() - started < 60, done.stderr[-2000:]
    if rank == 0:
        assert lines[0].startswith(f"main.py: waiting for rank(s) 1 of 2 at 127.0.0.1:{port} (")
        assert lines[-1] == (f"main.py: error: rank(s) 1 of 2 never joined the rendezvous at 127.0.0.1:{port} within "
                             "5 s (--dist-timeout); start every rank (srun/torchrun, or RANK 0..1) or look at the "
                             "missing ranks' logs")
    else:
        assert len(lines) == 1 and lines[0].startswith(f"main.py: error: rank 1 of 2: cannot reach rank 0's "
                                                       f"rendezvous at 127.0.0.1:{port} within 5 s")
    assert "Traceback" not in done.stderr and not (tmp_path / "ws").exists()
