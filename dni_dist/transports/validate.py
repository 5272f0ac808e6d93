"""Checks every received message against its stream before a stage sees it.

Both wires run these checks (torch.distributed in the transport's receive loop, gRPC in
its servicer, so a bad stream gets an error status instead of an ack). What a stream may
carry is fixed when the run starts: the tensor shapes and dtypes, a size limit, and the
steps. Steps are checked against what this stage itself did: an activation goes up in
strictly increasing step order; a gradient, bootstrap target or error comes down only for
a step this stage has already sent up, and each (kind, step) at most once per stream
(with bootstrapped targets a stage gets BOOTSTRAP and then GRAD for the same step: legal).
"""

from __future__ import annotations

import threading

import torch

from dni_dist.core.messages import Kind, Message, Stream, message_bytes
from dni_dist.transports.errors import TransportError

DEFAULT_MAX_MESSAGE_BYTES = 1 << 30
# Down-stream steps remembered for the duplicate check. Targets trail the newest step by
# at most the in-flight window (dist.max_in_flight, capped at 4096), so a step this far
# behind cannot be a legitimate target any more and is refused rather than remembered.
STEP_WINDOW = 1 << 14
DOWN_KINDS = (Kind.GRAD, Kind.BOOTSTRAP, Kind.ERROR)


class WireViolation(TransportError):
    """A received message broke its stream's contract; the message names stream and step."""


def stream_bytes(stream: Stream) -> int:
    """Bytes of one message on ``stream`` as ``message_bytes`` counts them."""
    itemsize = torch.empty((), dtype=stream.dtype).element_size()
    n = torch.Size(stream.shape).numel() * itemsize + 16  # the payload + the (kind, step) header
    if stream.up:
        n += torch.Size(stream.labels_shape).numel() * torch.empty((), dtype=stream.labels_dtype).element_size()
    return n


class SentSteps:
    """The newest step this stage has sent an activation for (shared by its down streams)."""

    def __init__(self) -> None:
        self.newest = -1
        self._lock = threading.Lock()

    def record(self, msg: Message) -> None:
        if msg.kind is Kind.ACTIVATION:
            with self._lock:
                self.newest = max(self.newest, msg.step)


class StreamGuard:
    """One inbound stream's checks and the step history they need (thread-safe)."""

    def __init__(self, stream: Stream, sent: SentSteps, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        size = stream_bytes(stream)
        if size > max_message_bytes:
            # Fixed shapes: every message on this stream would be refused, so refuse the run now.
            raise WireViolation(
                f"stream {stream.name}: messages of {size} bytes exceed dist.max_message_bytes={max_message_bytes}"
            )
        self.stream = stream
        self.sent = sent
        self.max_message_bytes = max_message_bytes
        self._last_up = -1
        self._newest_down = -1
        self._seen: set[tuple[Kind, int]] = set()
        self._lock = threading.Lock()

    def _fail(self, step: object, what: str) -> WireViolation:
        return WireViolation(f"stream {self.stream.name}: step {step}: {what}")

    def check(self, msg: Message) -> None:
        """Accept ``msg`` (and remember its step) or raise WireViolation saying why not."""
        stream = self.stream
        if (msg.src, msg.dst) != (stream.src, stream.dst):
            raise self._fail(msg.step, f"addressed {msg.src}->{msg.dst}")
        self._check_tensors(msg)
        with self._lock:
            if stream.up:
                self._check_up(msg)
            else:
                self._check_down(msg)

    def _check_tensors(self, msg: Message) -> None:
        stream = self.stream
        tensor = msg.tensor
        if tensor.dtype != stream.dtype or tuple(tensor.shape) != stream.shape:
            want = f"{str(stream.dtype).removeprefix('torch.')}{stream.shape}"
            raise self._fail(msg.step, f"tensor {tensor.dtype}{tuple(tensor.shape)} is not {want}")
        if stream.up:
            labels = msg.labels
            if labels is None:
                raise self._fail(msg.step, "an activation without labels")
            if labels.dtype != stream.labels_dtype or tuple(labels.shape) != stream.labels_shape:
                got = f"{labels.dtype}{tuple(labels.shape)}"
                raise self._fail(msg.step, f"labels {got} are not {stream.labels_dtype}{stream.labels_shape}")
        elif msg.labels is not None:
            raise self._fail(msg.step, f"a {msg.kind.value} must not carry labels")
        size = message_bytes(msg)
        if size > self.max_message_bytes:
            raise self._fail(msg.step, f"{size} bytes exceed dist.max_message_bytes={self.max_message_bytes}")

    def _check_up(self, msg: Message) -> None:
        if msg.kind is not Kind.ACTIVATION:
            raise self._fail(msg.step, f"an up stream carries activations, not {msg.kind.value} messages")
        if msg.step <= self._last_up:
            raise self._fail(msg.step, f"activations must arrive in increasing step order (last was {self._last_up})")
        self._last_up = msg.step

    def _check_down(self, msg: Message) -> None:
        if msg.kind not in DOWN_KINDS:
            raise self._fail(msg.step, f"a down stream does not carry {msg.kind.value} messages")
        if msg.step < 0 or msg.step > self.sent.newest:
            raise self._fail(msg.step, f"unknown step (newest activation sent: {self.sent.newest})")
        floor = self._newest_down - STEP_WINDOW
        if msg.step <= floor:
            raise self._fail(msg.step, f"more than {STEP_WINDOW} steps behind step {self._newest_down}")
        key = (msg.kind, msg.step)
        if key in self._seen:
            raise self._fail(msg.step, f"a second {msg.kind.value} for this step")
        self._seen.add(key)
        self._newest_down = max(self._newest_down, msg.step)
        if len(self._seen) > 4 * STEP_WINDOW:  # forget what the window no longer admits
            floor = self._newest_down - STEP_WINDOW
            self._seen = {k for k in self._seen if k[1] > floor}
