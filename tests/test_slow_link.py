"""The emulated slow link over the in-process transport: latency, bandwidth, bounded memory."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from dni_dist.core.messages import Kind, Message
from dni_dist.transports.base import Stream, message_bytes
from dni_dist.transports.inproc import InProcessHub, InProcessTransport
from dni_dist.transports.slow_link import SlowLinkTransport

SIZE = 1000  # floats per message


@pytest.fixture
def link(request):
    """(slowed sender at rank 0, plain receiver at rank 1) over one stream 0 -> 1."""
    latency, bandwidth, in_flight = request.param
    stream = Stream(0, 1, True, (SIZE,), labels_shape=(1,))
    hub = InProcessHub(capacity=4)
    sender = SlowLinkTransport(InProcessTransport(hub, 0, [], [stream]), latency, bandwidth, in_flight)
    receiver = InProcessTransport(hub, 1, [stream], [])
    sender.start()
    receiver.start()
    yield sender, receiver
    sender.close()
    receiver.close()


def _msg(i: int) -> Message:
    return Message(Kind.ACTIVATION, i, 0, 1, torch.full((SIZE,), float(i)), torch.tensor([i]))


def _receive_all(receiver: InProcessTransport, n: int) -> list[tuple[float, Message]]:
    receiver.expect(0, n)
    arrived = []
    for _ in range(n):
        msg = receiver.recv(timeout=30)
        arrived.append((time.monotonic(), msg))
    return arrived


@pytest.mark.parametrize("link", [(0.05, 0.0, 64)], indirect=True)
def test_messages_arrive_intact_in_order_and_not_before_the_latency(link) -> None:
    sender, receiver = link
    sent_at = {}
    for i in range(10):
        sent_at[i] = time.monotonic()
        sender.send(_msg(i))
    arrived = _receive_all(receiver, 10)
    assert [m.step for _, m in arrived] == list(range(10))
    for t, m in arrived:
        assert t - sent_at[m.step] >= 0.05
        torch.testing.assert_close(m.tensor, torch.full((SIZE,), float(m.step)))
        assert m.labels.tolist() == [m.step]
    sender.flush(5)
    assert sender.stats.messages_sent == 10  # the inner transport counts what left


@pytest.mark.parametrize("link", [(0.0, 200_000.0, 64)], indirect=True)
def test_a_bandwidth_cap_limits_throughput(link) -> None:
    sender, receiver = link
    n = 10
    started = time.monotonic()
    for i in range(n):
        sender.send(_msg(i))
    arrived = _receive_all(receiver, n)
    # Each message occupies the wire for size / bandwidth: n of them cannot finish sooner.
    assert arrived[-1][0] - started >= n * message_bytes(_msg(0)) / 200_000.0


@pytest.mark.parametrize("link", [(0.1, 0.0, 64)], indirect=True)
def test_latency_is_not_serialised_many_messages_are_in_flight(link) -> None:
    sender, receiver = link
    n, latency = 20, 0.1
    started = time.monotonic()
    done = threading.Thread(target=lambda: [sender.send(_msg(i)) for i in range(n)])
    done.start()
    arrived = _receive_all(receiver, n)
    done.join()
    elapsed = arrived[-1][0] - started
    assert latency <= elapsed < n * latency / 2


@pytest.mark.parametrize("link", [(1.0, 0.0, 2)], indirect=True)
def test_a_full_delay_line_blocks_the_sender(link) -> None:
    sender, receiver = link
    sender.send(_msg(0))
    sender.send(_msg(1))
    assert sender.queued == 2
    third = threading.Thread(target=sender.send, args=(_msg(2),))
    third.start()
    third.join(timeout=0.3)
    assert third.is_alive()  # blocked: both slots are in flight for a second
    assert sender.queued <= 2
    arrived = _receive_all(receiver, 3)
    third.join(timeout=5)
    assert not third.is_alive()
    assert [m.step for _, m in arrived] == [0, 1, 2]


@pytest.mark.parametrize("link", [(0.2, 0.0, 64)], indirect=True)
def test_flush_waits_until_the_link_is_empty(link) -> None:
    sender, receiver = link
    receiver.expect(0, 3)
    for i in range(3):
        sender.send(_msg(i))
    sender.flush(5)
    assert sender.queued == 0 and sender.stats.messages_sent == 3


def test_a_message_to_an_unknown_stage_is_refused() -> None:
    hub = InProcessHub()
    sender = SlowLinkTransport(InProcessTransport(hub, 0, [], [Stream(0, 1, True, (SIZE,))]), 0.01)
    sender.start()
    try:
        with pytest.raises(Exception, match="no stream to stage 2"):
            sender.send(Message(Kind.GRAD, 0, 0, 2, torch.zeros(SIZE)))
    finally:
        sender.close()
