"""PeerMonitor against a real TCPStore in one process: who is blamed when a rank is lost."""

from __future__ import annotations

import socket

import pytest
import torch.distributed as dist

from image_classification.training.rank_health import PeerMonitor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store_port():  # noqa: ANN201
    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    yield port
    del store


def _monitors(port: int, world: int):  # noqa: ANN202
    return [PeerMonitor(rank, world, interval=0.2, host="127.0.0.1", port=port).start() for rank in range(world)]


def test_a_rank_that_left_over_a_lost_peer_is_not_blamed(store_port: int) -> None:
    """Rank 2 is killed; rank 1 diagnoses first and leaves (PeerLost); rank 0, diagnosing after, blames rank 2
    alone -- not rank 1, whose heartbeat ended because it left over the lost peer."""
    zero, one, two = _monitors(store_port, 3)
    try:
        two.stop()  # killed: no heartbeat, no outcome
        assert one.diagnose(RuntimeError("Connection closed by peer")).lost == [2]
        one.stop()  # it raises PeerLost and exits
        failure = zero.diagnose(RuntimeError("Connection closed by peer"))
        assert failure.lost == [2] and "rank 2 stopped responding" in failure.message, failure.message
        assert "ranks" not in failure.message
    finally:
        for monitor in (zero, one, two):
            monitor.stop()


def test_a_rank_that_failed_on_its_own_is_named_with_its_error(store_port: int) -> None:
    zero, one = _monitors(store_port, 2)
    try:
        one.post_error("cannot read image /data/x.jpg: truncated", 2)
        one.stop()
        failure = zero.diagnose(RuntimeError("Connection reset by peer"))
        assert failure.lost == [1] and failure.exit_code == 2
        assert failure.message == "rank 1 failed: cannot read image /data/x.jpg: truncated"
    finally:
        zero.stop()
        one.stop()
