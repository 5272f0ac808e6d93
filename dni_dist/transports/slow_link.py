"""An emulated slow link around any transport: one-way latency and a bandwidth cap.

Each outbound stream gets a *delay line*: a message that enters at time t leaves the
link's wire at ``depart = max(t, previous depart) + nbytes / bandwidth`` and reaches the
inner transport's ``send`` at ``depart + latency``. Latency is not serialised: many
messages are in flight at once (as on a real link), so throughput is limited by the
bandwidth, not by the latency. The receiving side is the inner transport's, unchanged;
since every stage wraps its own outbound streams, every stream of a run is slowed.

Memory stays bounded like the base transport's outboxes: a delay line holds at most
``in_flight`` messages and ``send`` blocks while it is full.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from dni_dist.core.messages import Message
from dni_dist.transports.base import Transport, TransportError, TransportTimeout, message_bytes


class _DelayLine:
    """One outbound stream's link: due times are computed at entry, in entry order."""

    def __init__(self, latency: float, bandwidth: float, in_flight: int) -> None:
        self.latency = latency
        self.bandwidth = bandwidth
        self.slots = threading.Semaphore(in_flight)  # the bound: send blocks when all are taken
        self.items: queue.Queue[tuple[float, Message] | None] = queue.Queue()  # <= in_flight by the slots
        self.lock = threading.Lock()  # due times must be handed out in queue order
        self.last_depart = 0.0

    def enter(self, msg: Message) -> None:
        """Called after a slot was taken: schedule ``msg`` on the wire."""
        with self.lock:
            now = time.monotonic()
            depart = max(now, self.last_depart)
            if self.bandwidth > 0:
                depart += message_bytes(msg) / self.bandwidth
            self.last_depart = depart
            self.items.put((depart + self.latency, msg))


class SlowLinkTransport:
    """Wraps ``inner`` (any Transport); the stage loop uses it like the transport itself."""

    def __init__(self, inner: Transport, latency: float, bandwidth: float = 0.0, in_flight: int = 64) -> None:
        if latency < 0 or bandwidth < 0 or in_flight < 1:
            raise ValueError(f"slow link: latency={latency}, bandwidth={bandwidth}, in_flight={in_flight} must be >= 0")
        self.inner = inner
        self.latency = latency
        self.bandwidth = bandwidth
        self._lines = {dst: _DelayLine(latency, bandwidth, in_flight) for dst in inner.outbound}
        self._threads: list[threading.Thread] = []
        self._failure: BaseException | None = None
        self._closing = threading.Event()

    def __getattr__(self, name: str) -> Any:
        # Anything not slowed here (rank, inbound, outbound, capacity, address, ...) is the inner's.
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    @property
    def stats(self):  # bytes are counted when they really leave, by the inner transport
        return self.inner.stats

    def start(self) -> None:
        self.inner.start()
        for dst, line in self._lines.items():
            thread = threading.Thread(target=self._forward, args=(line,), name=f"slow link ->{dst}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _forward(self, line: _DelayLine) -> None:
        try:
            while (item := line.items.get()) is not None:
                due, msg = item
                try:
                    wait = due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    self.inner.send(msg)  # may block: the inner outbox pushes back on the link
                finally:
                    line.slots.release()
                    line.items.task_done()
        except BaseException as exc:  # surfaced to the stage loop on its next call
            if not self._closing.is_set():
                self._failure = exc

    def _check(self) -> None:
        if self._failure is not None:
            raise TransportError(f"rank {self.inner.rank}: slow link failed: {self._failure!r}") from self._failure

    # ---------------------------------------------------------------- API
    def send(self, msg: Message) -> None:
        line = self._lines.get(msg.dst)
        if line is None:
            raise TransportError(f"rank {self.inner.rank} has no stream to stage {msg.dst} for a {msg.kind.value}")
        while not line.slots.acquire(timeout=0.5):
            self._check()
        self._check()
        line.enter(msg)

    def expect(self, src: int, count: int) -> None:
        self.inner.expect(src, count)

    def recv(self, timeout: float) -> Message:
        self._check()
        return self.inner.recv(timeout)

    def try_recv(self) -> Message | None:
        self._check()
        return self.inner.try_recv()

    def flush(self, timeout: float) -> None:
        """Wait until every message has crossed the link and left the inner transport."""
        deadline = time.monotonic() + timeout
        for dst, line in self._lines.items():
            while line.items.unfinished_tasks:
                self._check()
                if time.monotonic() > deadline:
                    raise TransportTimeout(
                        f"rank {self.inner.rank}: slow link to {dst} did not drain in {timeout:.0f} s"
                    )
                time.sleep(0.001)
        self.inner.flush(max(0.0, deadline - time.monotonic()))

    @property
    def queued(self) -> int:
        """Messages held in this process: the inner transport's queues plus the delay lines."""
        # unfinished_tasks, not qsize: a message taken off the line but not yet handed to the
        # inner transport is still held here.
        return self.inner.queued + sum(line.items.unfinished_tasks for line in self._lines.values())

    def close(self) -> None:
        for line in self._lines.values():
            line.items.put(None)  # after what is in flight, like the base transport's outboxes
        for thread in self._threads:
            thread.join(timeout=self.latency + 5)
        self._closing.set()
        self.inner.close()
