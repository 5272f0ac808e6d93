"""Stages in one process (threads), wired by bounded queues: for tests and laptops."""

from __future__ import annotations

import queue

from dni_dist.core.messages import Message
from dni_dist.transports.base import Stream, Transport


class InProcessHub:
    """One bounded queue per stream, shared by the transports of every stage."""

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._wires: dict[tuple[int, int], queue.Queue[Message]] = {}

    def wire(self, src: int, dst: int) -> queue.Queue[Message]:
        return self._wires.setdefault((src, dst), queue.Queue(maxsize=self.capacity))


class InProcessTransport(Transport):
    def __init__(
        self,
        hub: InProcessHub,
        rank: int,
        inbound: list[Stream],
        outbound: list[Stream],
        capacity: int = 4,
        max_message_bytes: int | None = None,
    ):
        super().__init__(rank, inbound, outbound, capacity, max_message_bytes)
        self.hub = hub

    def _send_one(self, stream: Stream, msg: Message) -> None:
        self.hub.wire(stream.src, stream.dst).put(msg)

    def _receive_one(self, stream: Stream) -> Message:
        return self.hub.wire(stream.src, stream.dst).get()
