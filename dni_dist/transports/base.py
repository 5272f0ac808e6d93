"""The transport interface.

A stage talks over *streams*: one-directional, ordered channels from one stage to another,
each carrying one family of messages whose tensor shapes are fixed for the run (the
batch size is fixed, the last incomplete batch is dropped). Fixed shapes let a receiver
allocate before it knows what is coming, which is what NCCL and gloo point-to-point need.

- ``send`` enqueues and returns; it blocks only when that stream's outbox is full, which
  is how a slow receiver pushes back on a fast sender (bounded memory, never a drop).
- ``expect(src, n)`` arms the receiver for n more messages from ``src``; receivers never
  sit in a receive nobody will answer, so shutdown never hangs on one.
- ``recv`` returns the next message from any armed stream, or raises TransportTimeout.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from dni_dist.core.messages import CODE_KINDS, KIND_CODES, Message, Stream, message_bytes
from dni_dist.transports.errors import TransportError, TransportTimeout
from dni_dist.transports.validate import DEFAULT_MAX_MESSAGE_BYTES, SentSteps, StreamGuard


@dataclass
class TransportStats:
    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, sent: bool, nbytes: int) -> None:
        with self.lock:
            if sent:
                self.messages_sent += 1
                self.bytes_sent += nbytes
            else:
                self.messages_received += 1
                self.bytes_received += nbytes

    def summary(self) -> dict[str, int]:
        return {
            "messages_sent": self.messages_sent,
            "messages_received": self.messages_received,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
        }


class Transport(ABC):
    """Threads move bytes; the stage loop only sees ``send``/``recv``."""

    def __init__(
        self,
        rank: int,
        inbound: list[Stream],
        outbound: list[Stream],
        capacity: int = 4,
        max_message_bytes: int | None = None,
    ) -> None:

        self.rank = rank
        self.inbound = {s.src: s for s in inbound}
        self.outbound = {s.dst: s for s in outbound}
        self.capacity = capacity
        self.stats = TransportStats()
        self._inbox: queue.Queue[Message] = queue.Queue(maxsize=capacity)
        self._failure: BaseException | None = None
        self._closing = threading.Event()
        self._armed: dict[int, queue.Queue[int | None]] = {src: queue.Queue() for src in self.inbound}
        self._outboxes: dict[int, queue.Queue[Message | None]] = {
            dst: queue.Queue(maxsize=capacity) for dst in self.outbound
        }
        self._threads: list[threading.Thread] = []
        self.max_message_bytes = max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES
        self._sent_steps = SentSteps()
        self.guards = {src: StreamGuard(s, self._sent_steps, self.max_message_bytes) for src, s in self.inbound.items()}

    def start(self) -> None:
        for src, stream in self.inbound.items():
            self._spawn(self._receive_loop, stream, self._armed[src], name=f"recv {stream.name}")
        for dst, stream in self.outbound.items():
            self._spawn(self._send_loop, stream, self._outboxes[dst], name=f"send {stream.name}")

    def _spawn(self, target, *args, name: str) -> None:
        thread = threading.Thread(target=self._guard, args=(target, *args), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _guard(self, target, *args) -> None:
        try:
            target(*args)
        except BaseException as exc:  # surfaced to the stage loop on its next send/recv
            if not self._closing.is_set():
                self._failure = exc

    def _check(self) -> None:
        if self._failure is not None:
            raise TransportError(f"rank {self.rank}: transport thread failed: {self._failure!r}") from self._failure

    # ---------------------------------------------------------------- API
    def send(self, msg: Message) -> None:
        if msg.dst not in self._outboxes:
            raise TransportError(f"rank {self.rank} has no stream to stage {msg.dst} for a {msg.kind.value}")
        outbox = self._outboxes[msg.dst]
        self._sent_steps.record(msg)  # before it leaves: a reply can only follow this
        msg = self._stamp_outgoing(msg)
        while True:
            self._check()
            try:
                outbox.put(msg, timeout=0.5)
                return
            except queue.Full:
                continue

    def expect(self, src: int, count: int) -> None:
        if count:
            self._armed[src].put(count)

    def recv(self, timeout: float) -> Message:
        waited = 0.0
        while True:
            self._check()
            try:
                msg = self._inbox.get(timeout=min(0.5, timeout - waited))
            except queue.Empty:
                waited += 0.5
                if waited >= timeout:
                    raise TransportTimeout(f"rank {self.rank}: nothing arrived for {timeout:.0f} s") from None
                continue
            return self._take_incoming(msg)

    def try_recv(self) -> Message | None:
        self._check()
        try:
            return self._take_incoming(self._inbox.get_nowait())
        except queue.Empty:
            return None

    # Hooks run on the stage's (compute) thread, for transports whose tensors live on
    # device streams (torch_dist.py): order the send after the compute that made a message,
    # and the compute after the receive that brought one.
    def _stamp_outgoing(self, msg: Message) -> Message:
        return msg

    def _take_incoming(self, msg: Message) -> Message:
        return msg

    def flush(self, timeout: float) -> None:
        """Wait until every queued message has left this process."""
        deadline = time.monotonic() + timeout
        for dst, outbox in self._outboxes.items():
            # Queue.join() cannot time out; unfinished_tasks is what it waits on.
            while outbox.unfinished_tasks:
                self._check()
                if time.monotonic() > deadline:
                    raise TransportTimeout(f"rank {self.rank}: stream to {dst} did not drain in {timeout:.0f} s")
                time.sleep(0.002)

    @property
    def queued(self) -> int:
        """Messages held in this process's queues (for the bounded-memory checks)."""
        return self._inbox.qsize() + sum(o.qsize() for o in self._outboxes.values())

    def close(self) -> None:
        self._closing.set()
        for armed in self._armed.values():
            armed.put(None)
        for outbox in self._outboxes.values():
            # A full outbox means its sender thread is blocked on the peer: it is a daemon
            # and is left behind, but close itself must never block.
            with contextlib.suppress(queue.Full):
                outbox.put_nowait(None)
        for thread in self._threads:
            thread.join(timeout=5)

    # ------------------------------------------------------- wire threads
    def _receive_loop(self, stream: Stream, armed: queue.Queue[int | None]) -> None:
        while (count := armed.get()) is not None:
            for _ in range(count):
                msg = self._receive_one(stream)
                self._admit(stream, msg)
                self.stats.add(False, message_bytes(msg))
                while True:  # a full inbox blocks this thread: backpressure on the sender
                    try:
                        self._inbox.put(msg, timeout=0.5)
                        break
                    except queue.Full:
                        if self._closing.is_set():
                            return

    def _send_loop(self, stream: Stream, outbox: queue.Queue[Message | None]) -> None:
        while (msg := outbox.get()) is not None:
            try:
                self._send_one(stream, msg)
                self.stats.add(True, message_bytes(msg))
            finally:
                outbox.task_done()

    def _admit(self, stream: Stream, msg: Message) -> None:
        """Check a received message against its stream (validate.py); raises WireViolation."""
        self.guards[stream.src].check(msg)

    @abstractmethod
    def _send_one(self, stream: Stream, msg: Message) -> None: ...

    @abstractmethod
    def _receive_one(self, stream: Stream) -> Message: ...


__all__ = [
    "CODE_KINDS",
    "KIND_CODES",
    "Stream",
    "Transport",
    "TransportError",
    "TransportStats",
    "TransportTimeout",
    "message_bytes",
]
