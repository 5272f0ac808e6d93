"""The shared-memory transport (transport=shm): two stages' ends in one process, so every
property is checked without Ray; the Ray engine over it is in test_ray_engine.py."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time

import pytest
import torch

from dni_dist.core.messages import Kind, Message, Stream
from dni_dist.engines.placement import check_one_machine
from dni_dist.errors import ConfigError
from dni_dist.transports.errors import TransportError, TransportTimeout
from dni_dist.transports.shm import SharedMemoryTransport

CPU = torch.device("cpu")


@contextlib.contextmanager
def _pair(tmp_path, capacity: int = 4, timeout: float = 5.0, dtype: torch.dtype = torch.float32):
    """Stage 0 and stage 1 of a K=2 run: activations (with labels) up, gradients down;
    both closed on the way out."""
    up = Stream(0, 1, True, (3, 5), (3,), torch.long, dtype)
    down = Stream(1, 0, False, (3, 5), dtype=dtype)
    low = SharedMemoryTransport(0, [down], [up], tmp_path / "run", CPU, capacity, timeout)
    top = SharedMemoryTransport(1, [up], [down], tmp_path / "run", CPU, capacity, timeout)
    try:
        for end in (low, top):
            end.create_inbound()
        for end in (low, top):
            end.attach_outbound()
        yield low, top
    finally:
        low.close()
        top.close()


def _activation(step: int, dtype: torch.dtype = torch.float32) -> Message:
    x = (torch.arange(15, dtype=torch.float32).view(3, 5) + 100 * step).to(dtype)
    return Message(Kind.ACTIVATION, step, 0, 1, x, torch.tensor([step, 1, 2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_messages_cross_both_ways_in_order_with_kind_step_and_labels(tmp_path, dtype: torch.dtype) -> None:
    with _pair(tmp_path, dtype=dtype) as (low, top):
        for round_ in range(3):  # more messages than slots: the ring wraps around
            steps = range(4 * round_, 4 * round_ + 4)
            for step in steps:
                low.send(_activation(step, dtype))
            for step in steps:
                got = top.recv(5.0)
                assert (got.kind, got.step, got.src, got.dst) == (Kind.ACTIVATION, step, 0, 1)
                assert got.tensor.dtype == dtype and torch.equal(got.tensor, _activation(step, dtype).tensor)
                assert got.labels.tolist() == [step, 1, 2]
                top.send(Message(Kind.GRAD, step, 1, 0, -got.tensor))
            for step in steps:
                back = low.recv(5.0)
                assert (back.kind, back.step) == (Kind.GRAD, step) and back.labels is None
                assert torch.equal(back.tensor, -_activation(step, dtype).tensor)
        assert low.stats.messages_sent == top.stats.messages_received == 12
        assert top.stats.messages_sent == low.stats.messages_received == 12


def test_a_received_message_is_a_copy_the_sender_cannot_overwrite(tmp_path) -> None:
    with _pair(tmp_path, capacity=1) as (low, top):
        low.send(_activation(0))
        first = top.recv(5.0)
        low.send(_activation(1))  # into the same slot, freed by the receive
        assert torch.equal(first.tensor, _activation(0).tensor)


def test_a_full_ring_holds_the_sender_back_until_the_receiver_takes_one(tmp_path) -> None:
    with _pair(tmp_path, capacity=2) as (low, top):
        low.send(_activation(0))
        low.send(_activation(1))
        third = threading.Thread(target=low.send, args=(_activation(2),))
        third.start()
        time.sleep(0.3)
        assert third.is_alive()  # blocked: bounded memory, not a drop
        assert top.recv(5.0).step == 0
        third.join(5.0)
        assert not third.is_alive()
        assert [top.recv(5.0).step for _ in range(2)] == [1, 2]


def test_a_receiver_that_takes_nothing_times_the_sender_out(tmp_path) -> None:
    with _pair(tmp_path, capacity=1, timeout=0.3) as (low, top):
        low.send(_activation(0))
        with pytest.raises(TransportTimeout, match="the receiver took nothing"):
            low.send(_activation(1))
        with pytest.raises(TransportTimeout, match="nothing arrived"):
            low.recv(0.2)
        assert top.try_recv().step == 0 and top.try_recv() is None


def test_nothing_stays_on_disk(tmp_path) -> None:
    with _pair(tmp_path):
        assert not (tmp_path / "run").exists()  # both ends mapped and opened: the files are gone
    alone = SharedMemoryTransport(1, [Stream(0, 1, True, (2,), (2,))], [], tmp_path / "lone", CPU)
    alone.create_inbound()
    assert len(list((tmp_path / "lone").iterdir())) == 3  # ring, data, credit: no sender came
    alone.close()
    assert not (tmp_path / "lone").exists()


def test_a_sender_without_its_receivers_ring_stops_in_one_line(tmp_path) -> None:
    lone = SharedMemoryTransport(0, [], [Stream(0, 1, True, (2,), (2,))], tmp_path / "none", CPU)
    with pytest.raises(TransportError, match=r"no shared-memory ring for stream up 0->1.*one machine"):
        lone.attach_outbound()


def test_stages_on_two_machines_are_refused_before_anything_starts() -> None:
    check_one_machine("shm", ["node-a", "node-a"])
    check_one_machine("gloo", ["node-a", "node-b"])
    with pytest.raises(ConfigError, match=r"transport=shm needs every stage on one machine.*2 nodes"):
        check_one_machine("shm", ["node-a", "node-b", "node-a"])


def test_too_little_shared_memory_stops_in_one_line_before_a_page_is_written(tmp_path, monkeypatch) -> None:
    class Tiny:
        f_bavail, f_frsize = 10, 4096  # 40 KiB free

    monkeypatch.setattr(os, "statvfs", lambda path: Tiny())
    big = SharedMemoryTransport(1, [Stream(0, 1, True, (64, 256), (64,))], [], tmp_path / "small", CPU)
    with pytest.raises(TransportError, match=r"transport=shm needs 0\.3 MiB .* 0\.0 MiB free.*--shm-size"):
        big.create_inbound()
    big.close()


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="rings are sparse files without posix_fallocate")
def test_ring_pages_are_reserved_up_front_and_a_full_dev_shm_is_one_line(tmp_path, monkeypatch) -> None:
    """Space that something else takes after the free-space check must not show later as a
    SIGBUS on a ring's first write: the pages are allocated when the ring is made."""
    stream = Stream(0, 1, True, (64, 256), (64,))
    ok = SharedMemoryTransport(1, [stream], [], tmp_path / "ok", CPU)
    ok.create_inbound()
    [ring] = [p for p in (tmp_path / "ok").iterdir() if p.stat().st_size > 0]
    assert ring.stat().st_blocks * 512 >= ring.stat().st_size  # allocated, not sparse
    ok.close()

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    late = SharedMemoryTransport(1, [stream], [], tmp_path / "late", CPU)
    with pytest.raises(
        TransportError, match=r"rank 1: transport=shm could not reserve 0\.\d MiB .*No space left.*--shm-size"
    ):
        late.create_inbound()
    late.close()
    assert not (tmp_path / "late").exists()  # nothing half-made is left in a /dev/shm that is short already


def test_auto_takes_shared_memory_only_for_cpu_stages_on_one_node_with_room() -> None:
    from dni_dist.engines.ray_engine import choose_transport

    asked_room: list[bool] = []

    def room(answer: bool):
        def ask() -> bool:
            asked_room.append(answer)
            return answer

        return ask

    assert choose_transport("auto", ["n1", "n1"], True, room(True)) == "shm"
    assert choose_transport("auto", ["n1", "n1"], True, room(False)) == "gloo"  # a small /dev/shm, or no FIFOs
    assert len(asked_room) == 2
    assert choose_transport("auto", ["n1", "n2"], True, room(True)) == "gloo"  # placed on two nodes
    assert choose_transport("auto", ["n1", "n1"], False, room(True)) == "gloo"  # GPU stages
    for asked in ("gloo", "grpc", "nccl", "shm"):
        assert choose_transport(asked, ["n1", "n2"], False, room(False)) == asked
    assert len(asked_room) == 2  # the node is asked only when the rest allows shared memory


def test_shm_room_checks_the_free_space_on_the_node(monkeypatch) -> None:
    from dni_dist.transports import shm

    streams = [Stream(0, 1, True, (64, 256), (64,)), Stream(1, 0, False, (64, 256))]
    assert shm.shm_room(streams, 4)
    monkeypatch.setattr(shm, "_free_bytes", lambda path: shm.ring_bytes(streams, 4) - 1)
    assert not shm.shm_room(streams, 4)
