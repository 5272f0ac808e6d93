"""gRPC streams between stages, for links where NCCL cannot go (across clusters, clouds).

Each stage serves the ``Stage`` service of proto/dni.proto on its own port (loopback by
default). For each outbound stream a stage opens one bidirectional ``Exchange`` call to
the receiver: a handshake first (protocol version, run id, stream, tensor shapes and
dtypes), then every message as frames of about 1 MiB. The receiver acknowledges a message
once its bounded queue has taken it; a sender keeps at most ``capacity`` messages
unacknowledged, so a slow receiver blocks its sender exactly as the engine's queues do.
CUDA tensors travel as host copies. Every message is checked (codec.py, validate.py)
before it is acknowledged. Off loopback the server requires TLS and a shared token
(grpc_security.py).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import torch

from dni_dist.core.messages import Message
from dni_dist.transports.base import Stream, Transport, TransportError
from dni_dist.transports.grpc_security import GrpcSecurity
from dni_dist.transports.validate import StreamGuard, WireViolation
from dni_dist.wire import dni_pb2 as pb
from dni_dist.wire import dni_pb2_grpc as pb_grpc
from dni_dist.wire.codec import CHUNK_BYTES, Assembler, WireError, check_handshake, handshake, message_frames

_MIN_FRAME = 16 * 2**20  # a frame is about one chunk; leave room for headers and labels
_KEEPALIVE = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000)]


def frame_limit(chunk_bytes: int, max_message_bytes: int) -> int:
    """Largest frame either side handles: a chunk plus labels and headers, and never more
    than a whole message may be (so an oversized frame is refused before it is parsed)."""
    return min(max(_MIN_FRAME, 2 * chunk_bytes), max_message_bytes + 2**20)


def channel_options(limit: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        *_KEEPALIVE,
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(limit: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ]


_END = object()


class StageServicer(pb_grpc.StageServicer):
    """The receiving side: checks each stream's handshake, frames and messages (the
    stream's guard, validate.py), then delivers whole messages through ``deliver`` (which
    blocks while the stage's queue is full). A bad call ends with an error status; the
    server and its other streams carry on."""

    def __init__(self, rank: int, run_id: str, inbound: dict[int, Stream], guards: dict[int, StreamGuard], deliver):
        self.rank = rank
        self.run_id = run_id
        self.inbound = inbound
        self.guards = guards
        self.deliver = deliver

    def _open(self, requests: Iterator[pb.Frame], context: grpc.ServicerContext) -> Stream:
        try:
            first = next(requests)
            return check_handshake(first, self.inbound, self.rank, self.run_id)
        except StopIteration:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stream ended before its handshake")
        except WireError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        raise AssertionError("unreachable: abort raises")

    def _messages(self, requests: Iterator[pb.Frame], context: grpc.ServicerContext, stream: Stream) -> Iterator[int]:
        """Assemble, check and deliver each message; yields its step once delivered."""
        assembler = Assembler(stream)
        guard = self.guards[stream.src]
        for frame in requests:
            try:
                msg = assembler.feed(frame)
                if msg is not None:
                    guard.check(msg)
            except WireError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"stream {stream.name}: {exc}")
            except WireViolation as exc:  # names the stream itself
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if msg is not None:
                self.deliver(msg)
                yield msg.step
        if assembler.partial:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"stream {stream.name}: ended inside a message")

    def Exchange(self, request_iterator: Iterator[pb.Frame], context: grpc.ServicerContext) -> Iterator[pb.Ack]:
        stream = self._open(request_iterator, context)
        yield pb.Ack(step=-1, ok=True)
        for step in self._messages(request_iterator, context, stream):
            yield pb.Ack(step=step, ok=True)

    def Push(self, request_iterator: Iterator[pb.Frame], context: grpc.ServicerContext) -> pb.Ack:
        stream = self._open(request_iterator, context)
        last = -1
        for last in self._messages(request_iterator, context, stream):  # noqa: B007 (the last one is the answer)
            pass
        return pb.Ack(step=last, ok=True)


class _Outbound:
    """One Exchange call: frames go into a queue its request iterator drains; a reader
    thread takes the acknowledgements as they come, so a peer that goes away is noticed at
    once (through ``on_failure``), not when the sender next needs room in its window."""

    def __init__(
        self,
        channel: grpc.Channel,
        stream: Stream,
        run_id: str,
        capacity: int,
        metadata: list[tuple[str, str]],
        on_failure: Callable[[BaseException], None],
    ) -> None:
        self.channel = channel
        self.stream = stream
        self.frames: queue.Queue = queue.Queue(maxsize=64)
        self.frames.put(handshake(stream, run_id))
        self.acks = pb_grpc.StageStub(channel).Exchange(self._requests(), metadata=metadata)
        self.window = threading.Semaphore(capacity)  # messages sent but not yet acknowledged
        self.failure: BaseException | None = None
        self.closed = False
        self.on_failure = on_failure
        ack = self.next_ack()
        if not ack.ok:
            raise TransportError(f"stream {stream.name}: handshake refused: {ack.error}")
        self._reader = threading.Thread(target=self._read_acks, name=f"acks {stream.name}", daemon=True)
        self._reader.start()

    def _read_acks(self) -> None:
        try:
            for ack in self.acks:
                if not ack.ok:
                    raise TransportError(f"stream {self.stream.name}: step {ack.step} refused: {ack.error}")
                self.window.release()
            raise TransportError(f"stream {self.stream.name}: the peer ended the stream")
        except grpc.RpcError as exc:
            failure: BaseException = TransportError(
                f"stream {self.stream.name}: peer went away: {exc.code().name}: {exc.details()}"
            )
        except TransportError as exc:
            failure = exc
        if not self.closed:
            self.failure = failure
            self.on_failure(failure)
        self.window.release()  # wake a sender waiting for room

    def reserve(self) -> None:
        """Wait for room in the window of unacknowledged messages."""
        while not self.window.acquire(timeout=0.5):
            if self.failure is not None:
                raise self.failure
        if self.failure is not None:
            raise self.failure

    def _requests(self) -> Iterator[pb.Frame]:
        while (frame := self.frames.get()) is not _END:
            yield frame

    def next_ack(self) -> pb.Ack:
        try:
            return next(self.acks)
        except grpc.RpcError as exc:
            raise TransportError(f"peer refused the stream: {exc.code().name}: {exc.details()}") from None

    def close(self) -> None:
        self.closed = True
        self.frames.put(_END)
        self.acks.cancel()
        self.channel.close()


class GrpcTransport(Transport):
    def __init__(
        self,
        rank: int,
        inbound: list[Stream],
        outbound: list[Stream],
        run_id: str,
        bind_host: str = "127.0.0.1",
        advertise_host: str | None = None,
        capacity: int = 4,
        compute_device: torch.device | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        timeout: float = 300.0,
        security: GrpcSecurity | None = None,
        max_message_bytes: int | None = None,
        token_env: str = "DNI_GRPC_TOKEN",
    ) -> None:
        self.security = security or GrpcSecurity()
        self.security.require_for(bind_host, token_env)  # ConfigError off loopback without TLS and token
        super().__init__(rank, inbound, outbound, capacity, max_message_bytes)
        self.run_id = run_id
        self.chunk_bytes = chunk_bytes
        self.timeout = timeout
        self.compute_device = compute_device or torch.device("cpu")
        self._delivered = {src: queue.Queue(maxsize=capacity) for src in self.inbound}
        self._outbound: dict[int, _Outbound] = {}
        self.frame_limit = frame_limit(chunk_bytes, self.max_message_bytes)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=len(inbound) + 4),
            interceptors=self.security.interceptors(),
            options=server_options(self.frame_limit),
        )
        servicer = StageServicer(rank, run_id, self.inbound, self.guards, self._deliver)
        pb_grpc.add_StageServicer_to_server(servicer, self.server)
        port = self.security.add_port(self.server, f"{bind_host}:0")
        if port == 0:
            raise TransportError(f"stage {rank}: could not listen on {bind_host}")
        self.server.start()
        self.address = f"{advertise_host or bind_host}:{port}"
        self._lock = threading.Lock()

    def _deliver(self, msg: Message) -> None:
        self._delivered[msg.src].put(msg)  # blocks when full: no ack until there is room

    def connect(self, peers: dict[int, str]) -> None:
        """Open the outbound streams (handshakes included) to the peers' servers."""
        for dst, stream in self.outbound.items():
            channel = self.security.channel(peers[dst], channel_options(self.frame_limit))
            grpc.channel_ready_future(channel).result(timeout=self.timeout)
            self._outbound[dst] = _Outbound(
                channel, stream, self.run_id, self.capacity, self.security.metadata(), self._fail
            )

    def _fail(self, exc: BaseException) -> None:
        if not self._closing.is_set():
            self._failure = exc  # the stage loop raises it on its next send or recv poll

    def _send_one(self, stream: Stream, msg: Message) -> None:
        out = self._outbound[stream.dst]
        out.reserve()
        for frame in message_frames(msg, self.chunk_bytes):
            out.frames.put(frame)

    def _admit(self, stream: Stream, msg: Message) -> None:
        """Nothing to do: the servicer checked the message before acknowledging it."""

    def _receive_one(self, stream: Stream) -> Message:
        msg = self._delivered[stream.src].get()
        if self.compute_device.type != "cpu":
            msg.tensor = msg.tensor.to(self.compute_device)
            msg.labels = None if msg.labels is None else msg.labels.to(self.compute_device)
        return msg

    def close(self) -> None:
        super().close()
        for out in self._outbound.values():
            out.close()
        self.server.stop(grace=1.0)
