"""Hostile peers: a stage's gRPC server refuses every bad stream with an error status, keeps
running, and still delivers valid messages intact afterwards. Plus the stream checks
(validate.py) that both wires run on every received message."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dni_dist.core.messages import Kind, Message
from dni_dist.transports.base import Stream, TransportError
from dni_dist.transports.grpc_transport import GrpcTransport
from dni_dist.transports.inproc import InProcessHub, InProcessTransport
from dni_dist.transports.validate import STEP_WINDOW, SentSteps, StreamGuard, WireViolation
from dni_dist.wire import dni_pb2 as pb
from dni_dist.wire import dni_pb2_grpc as rpc
from dni_dist.wire.codec import handshake, message_frames

RUN = "fuzz-run"
UP = Stream(0, 1, True, (4, 3), (4,))  # into stage 1 from below
DOWN = Stream(2, 1, False, (4, 3))  # into stage 1 from above
OUT = Stream(1, 2, True, (4, 3), (4,))  # stage 1's activations, so steps 0..9 are "known" down
MAX_BYTES = 4096  # frames beyond about 1 MiB are refused by gRPC itself
PAYLOAD_BYTES = 4 * 3 * 4
KNOWN_STEPS = 10
DELIVERED_GRAD = 3  # the one gradient delivered before fuzzing: its replays are duplicates
BATCH = 48  # calls in flight at once


def _activation(step: int, value: float = 0.0) -> Message:
    return Message(Kind.ACTIVATION, step, 0, 1, torch.full((4, 3), value), torch.arange(4))


def _frame_bytes(msg: Message) -> bytes:
    (frame,) = message_frames(msg)
    return frame.SerializeToString()


HELLO_UP = handshake(UP, RUN).SerializeToString()
HELLO_DOWN = handshake(DOWN, RUN).SerializeToString()
VALID_UP = _frame_bytes(_activation(0))
VALID_DOWN = _frame_bytes(Message(Kind.GRAD, DELIVERED_GRAD, 2, 1, torch.zeros(4, 3)))


# ------------------------------------------------------------------ bad calls
# Each bad call is a list of serialized frames; every one of them must end in an error status.


def _mutated(hello: bytes, valid: bytes, mutate: Callable[[pb.Frame], None]) -> list[bytes]:
    frame = pb.Frame.FromString(valid)
    mutate(frame)
    return [hello, frame.SerializeToString()]


def _part(frame: pb.Frame) -> pb.Activation | pb.Gradient:
    return frame.activation if frame.WhichOneof("body") == "activation" else frame.gradient


def _set_shape(shape: list[int]) -> Callable[[pb.Frame], None]:
    def mutate(frame: pb.Frame) -> None:
        tensor = _part(frame).tensor
        del tensor.shape[:]
        tensor.shape.extend(shape)

    return mutate


def _set(path: str, value: object) -> Callable[[pb.Frame], None]:
    """Set ``tensor.dtype``, ``step``, ``labels.data`` ... on the frame's activation/gradient."""

    def mutate(frame: pb.Frame) -> None:
        target = _part(frame)
        *parents, leaf = path.split(".")
        for name in parents:
            target = getattr(target, name) if name in target.DESCRIPTOR.fields_by_name else None
        if target is None or leaf not in target.DESCRIPTOR.fields_by_name:
            return  # e.g. labels, after an earlier mutation made the frame a gradient: invalid already
        setattr(target, leaf, value)

    return mutate


int64s = st.integers(-(2**63), 2**63 - 1)
uint32s = st.integers(0, 2**32 - 1)
# Mutations that make a frame of either stream invalid, drawn by hypothesis.
COMMON = st.one_of(
    st.text(max_size=12).filter(lambda s: s != "float32").map(lambda s: _set("tensor.dtype", s)),
    st.lists(st.integers(-5, 2**40), max_size=5).filter(lambda s: s != [4, 3]).map(_set_shape),
    st.integers(1, 2**32 - 1).map(lambda i: _set("tensor.chunk_index", i)),
    uint32s.filter(lambda c: c != 1).map(lambda c: _set("tensor.chunk_count", c)),  # ends mid-message or out of range
    st.binary(max_size=96).filter(lambda b: len(b) != PAYLOAD_BYTES).map(lambda b: _set("tensor.data", b)),
    st.integers(-(2**63), -1).map(lambda s: _set("step", s)),
)
UP_ONLY = st.one_of(
    st.integers(-(2**63), 0).map(lambda s: _set("step", s)),  # step 0 was delivered: replays are refused
    st.text(max_size=8).filter(lambda s: s != "int64").map(lambda s: _set("labels.dtype", s)),
    st.binary(max_size=64).filter(lambda b: len(b) != 32).map(lambda b: _set("labels.data", b)),
    st.just(lambda f: f.activation.ClearField("labels")),
)
DOWN_ONLY = st.one_of(
    st.integers(KNOWN_STEPS, 2**63 - 1).map(lambda s: _set("step", s)),  # never sent up: unknown
    st.just(_set("step", DELIVERED_GRAD)),  # a second GRAD for a step
    st.integers(-(2**31), 2**31 - 1).filter(lambda k: k not in (2, 3, 4)).map(lambda k: _set("kind", k)),
)
WRONG_BODY = st.sampled_from(
    [
        lambda f: f.CopyFrom(pb.Frame()),
        lambda f: f.CopyFrom(pb.Frame.FromString(HELLO_UP)),  # a second handshake
        lambda f: f.CopyFrom(pb.Frame.FromString(VALID_DOWN if f.HasField("activation") else VALID_UP)),
    ]
)


@st.composite
def bad_calls(draw: st.DrawFn) -> list[bytes]:
    up = draw(st.booleans())
    hello, valid, own = (HELLO_UP, VALID_UP, UP_ONLY) if up else (HELLO_DOWN, VALID_DOWN, DOWN_ONLY)
    mutations = draw(st.lists(st.one_of(COMMON, own, WRONG_BODY), min_size=1, max_size=3))
    frame = pb.Frame.FromString(valid)
    if up:
        frame.activation.step = 0  # the step alone is a replay: every up call stays invalid
    for mutate in mutations:
        mutate(frame)
    return [hello, frame.SerializeToString()]


def _seeded_bad_calls(rng: random.Random) -> Iterator[list[bytes]]:
    """Truncations, garbage, bad handshakes, oversized frames, out-of-order steps."""
    for hello in (HELLO_UP, HELLO_DOWN):
        for cut in range(len(hello)):  # every truncation of a handshake
            yield [hello[:cut]]
    for hello, valid in ((HELLO_UP, VALID_UP), (HELLO_DOWN, VALID_DOWN)):
        for cut in range(len(valid)):  # every truncation of a message frame
            yield [hello, valid[:cut]]
    for _ in range(1500):  # garbage where the handshake should be
        yield [rng.randbytes(rng.randrange(0, 80))]
    for _ in range(500):  # garbage after a good handshake
        yield [rng.choice((HELLO_UP, HELLO_DOWN)), rng.randbytes(rng.randrange(1, 120))]
    for _ in range(300):  # handshakes that do not match any stream of this stage
        frame = pb.Frame.FromString(rng.choice((HELLO_UP, HELLO_DOWN)))
        h = frame.handshake
        field = rng.randrange(6)
        if field == 0:
            h.protocol_version = rng.choice([0, 2, 7, -1])
        elif field == 1:
            h.run_id = RUN + str(rng.randrange(10**6))
        elif field == 2:
            h.src_stage = rng.choice([1, 3, 99, -1])
        elif field == 3:
            h.dst_stage = rng.choice([0, 2, 5, -7])
        elif field == 4:
            h.up = not h.up
        else:
            h.tensors[0].shape[0] = rng.choice([0, 5, 1 << 40])
        yield [frame.SerializeToString()]
    for step in range(1, 400):  # gradients for steps this stage never sent up
        msg = Message(rng.choice([Kind.GRAD, Kind.BOOTSTRAP, Kind.ERROR]), KNOWN_STEPS + step, 2, 1, torch.zeros(4, 3))
        yield [HELLO_DOWN, _frame_bytes(msg)]
    for _ in range(100):  # a message cut short: the stream ends before its last chunk
        frame = pb.Frame.FromString(rng.choice((VALID_UP, VALID_DOWN)))
        part = _part(frame)
        part.tensor.chunk_count = rng.randrange(2, PAYLOAD_BYTES + 1)
        part.tensor.data = part.tensor.data[: rng.randrange(1, PAYLOAD_BYTES)]
        yield [HELLO_UP if frame.HasField("activation") else HELLO_DOWN, frame.SerializeToString()]
    for _ in range(100):  # valid messages, replayed out of order
        yield [HELLO_UP, _frame_bytes(_activation(0, rng.random()))]
    oversized = pb.Frame.FromString(VALID_DOWN)
    oversized.gradient.tensor.data = bytes(2**20 + 4096)  # past the frame limit: refused unparsed
    for _ in range(8):
        yield [HELLO_DOWN, oversized.SerializeToString()]


# ---------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def stage() -> Iterator[GrpcTransport]:
    grpc_log = logging.getLogger("grpc")  # thousands of "Exception deserializing" lines
    level = grpc_log.level
    grpc_log.setLevel(logging.CRITICAL)
    sink = GrpcTransport(2, [OUT], [], RUN)
    server = GrpcTransport(1, [UP, DOWN], [OUT], RUN, max_message_bytes=MAX_BYTES)
    try:
        server.connect({2: sink.address})
        sink.start()
        server.start()
        sink.expect(1, KNOWN_STEPS)
        for step in range(KNOWN_STEPS):  # stage 1 sends these up, so gradients may come back for them
            server.send(Message(Kind.ACTIVATION, step, 1, 2, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)))
        assert [sink.recv(timeout=30).step for _ in range(KNOWN_STEPS)] == list(range(KNOWN_STEPS))
        with grpc.insecure_channel(server.address) as channel:  # the messages whose replays are refused
            push = _raw_stub(channel, "Push")
            assert push(iter([HELLO_UP, VALID_UP]), timeout=30).ok
            assert push(iter([HELLO_DOWN, VALID_DOWN]), timeout=30).ok
        server.expect(0, 1)
        server.expect(2, 1)
        got = {server.recv(timeout=30).kind for _ in range(2)}
        assert got == {Kind.ACTIVATION, Kind.GRAD}
        yield server
    finally:
        server.close()
        sink.close()
        grpc_log.setLevel(level)


def _raw_stub(channel: grpc.Channel, method: str):
    """A call that sends frames as raw bytes, so they can be truncated or garbage."""
    make = channel.stream_unary if method == "Push" else channel.stream_stream
    return make(f"/dni.Stage/{method}", request_serializer=None, response_deserializer=pb.Ack.FromString)


def _fire(channel: grpc.Channel, calls: list[list[bytes]]) -> list[grpc.StatusCode]:
    """Send each call (alternately Push and Exchange, many in flight) and return its status."""
    push, exchange = _raw_stub(channel, "Push"), _raw_stub(channel, "Exchange")
    pending: list[tuple[str, object]] = []
    for i, frames in enumerate(calls):
        if i % 2:
            pending.append(("exchange", exchange(iter(frames), timeout=60)))
        else:
            pending.append(("push", push.future(iter(frames), timeout=60)))
    codes = []
    for how, call in pending:
        if how == "exchange":
            try:
                for _ in call:  # acks (a handshake ack may come before the refusal)
                    pass
            except grpc.RpcError:
                pass
        else:
            call.exception()  # waits; the status is what matters
        codes.append(call.code())
    return codes


def _fire_all(channel: grpc.Channel, calls: Iterator[list[bytes]]) -> dict[grpc.StatusCode, int]:
    statuses: dict[grpc.StatusCode, int] = {}
    batch: list[list[bytes]] = []
    for frames in calls:
        batch.append(frames)
        if len(batch) == BATCH:
            _tally(statuses, batch, _fire(channel, batch))
            batch = []
    if batch:
        _tally(statuses, batch, _fire(channel, batch))
    return statuses


def _tally(statuses: dict[grpc.StatusCode, int], calls: list[list[bytes]], codes: list[grpc.StatusCode]) -> None:
    for frames, code in zip(calls, codes, strict=True):
        assert code is not grpc.StatusCode.OK, f"a bad call was accepted: {frames!r}"
        statuses[code] = statuses.get(code, 0) + 1


# ------------------------------------------------------------------ the fuzz


@pytest.mark.slow
def test_ten_thousand_bad_calls_are_refused_and_the_stage_keeps_serving(stage: GrpcTransport) -> None:
    statuses: dict[grpc.StatusCode, int] = {}
    with grpc.insecure_channel(stage.address) as channel:
        for code, n in _fire_all(channel, _seeded_bad_calls(random.Random(8))).items():
            statuses[code] = statuses.get(code, 0) + n

        @settings(
            max_examples=150,  # x BATCH calls: with the seeded ones, over 10,000
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(st.lists(bad_calls(), min_size=BATCH, max_size=BATCH))
        def hostile_batches(calls: list[list[bytes]]) -> None:
            _tally(statuses, calls, _fire(channel, calls))

        hostile_batches()
    refused = sum(statuses.values())
    assert refused >= 10_000, statuses
    # Every kind of fault showed up, each with its own status.
    assert {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION} <= set(statuses)
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in statuses  # the oversized frames
    assert grpc.StatusCode.UNKNOWN not in statuses, statuses  # no handler crashed
    assert stage._failure is None
    _a_valid_stream_still_works(stage, bootstrap_step=DELIVERED_GRAD)


def _a_valid_stream_still_works(stage: GrpcTransport, bootstrap_step: int) -> None:
    step = 1 + max(stage.guards[0]._last_up, 0)
    sent = _activation(step)
    sent.tensor = torch.arange(12, dtype=torch.float32).view(4, 3)
    with grpc.insecure_channel(stage.address) as channel:
        frames = [pb.Frame.FromString(HELLO_UP), *message_frames(sent)]
        ack = rpc.StageStub(channel).Push(iter(frames), timeout=30)
        assert ack.ok and ack.step == step
        # A bootstrap target for a step that already had its GRAD is legal (sg.target=lambda).
        later = Message(Kind.BOOTSTRAP, bootstrap_step, 2, 1, torch.full((4, 3), 0.5))
        ack = rpc.StageStub(channel).Push(iter([pb.Frame.FromString(HELLO_DOWN), *message_frames(later)]), timeout=30)
        assert ack.ok and ack.step == bootstrap_step
    stage.expect(0, 1)
    stage.expect(2, 1)
    got = {msg.kind: msg for msg in (stage.recv(timeout=30), stage.recv(timeout=30))}
    assert got[Kind.ACTIVATION].step == step
    assert torch.equal(got[Kind.ACTIVATION].tensor, sent.tensor)
    assert torch.equal(got[Kind.ACTIVATION].labels, sent.labels)
    assert torch.equal(got[Kind.BOOTSTRAP].tensor, later.tensor)


def test_a_few_bad_calls_of_each_kind_leave_the_stage_serving(stage: GrpcTransport) -> None:
    """The quick version of the fuzz (a sample of each fault) for the fast suite."""
    calls = list(_seeded_bad_calls(random.Random(3)))[::40]
    with grpc.insecure_channel(stage.address) as channel:
        statuses = _fire_all(channel, iter(calls))
    assert sum(statuses.values()) == len(calls) > 50
    assert grpc.StatusCode.UNKNOWN not in statuses
    _a_valid_stream_still_works(stage, bootstrap_step=DELIVERED_GRAD + 1)


# ------------------------------------------------------------ stream checks


def _guard(stream: Stream, max_bytes: int = 1 << 20) -> tuple[StreamGuard, SentSteps]:
    sent = SentSteps()
    return StreamGuard(stream, sent, max_bytes), sent


def test_activations_must_arrive_in_increasing_step_order() -> None:
    guard, _ = _guard(UP)
    guard.check(_activation(0))
    guard.check(_activation(2))
    with pytest.raises(WireViolation, match=r"stream up 0->1: step 2: .*increasing step order"):
        guard.check(_activation(2))
    with pytest.raises(WireViolation, match=r"step 1: .*increasing"):
        guard.check(_activation(1))


def test_targets_come_only_for_sent_steps_and_once_per_kind() -> None:
    guard, sent = _guard(DOWN)
    grad = Message(Kind.GRAD, 0, 2, 1, torch.zeros(4, 3))
    with pytest.raises(WireViolation, match="stream down 2->1: step 0: unknown step"):
        guard.check(grad)
    sent.record(Message(Kind.ACTIVATION, 0, 1, 2, torch.zeros(4, 3)))
    guard.check(Message(Kind.BOOTSTRAP, 0, 2, 1, torch.zeros(4, 3)))
    guard.check(grad)  # BOOTSTRAP then GRAD for one step: the lambda target
    with pytest.raises(WireViolation, match="step 0: a second grad"):
        guard.check(grad)
    with pytest.raises(WireViolation, match="does not carry activation messages"):
        guard.check(Message(Kind.ACTIVATION, 0, 2, 1, torch.zeros(4, 3)))


def test_the_duplicate_memory_stays_bounded() -> None:
    guard, sent = _guard(DOWN)
    last = 5 * STEP_WINDOW
    sent.newest = last
    for step in range(0, last, 2):
        guard.check(Message(Kind.GRAD, step, 2, 1, torch.zeros(4, 3)))
    assert len(guard._seen) <= 4 * STEP_WINDOW + 1
    with pytest.raises(WireViolation, match="steps behind"):  # too old to tell: refused, not forgotten
        guard.check(Message(Kind.GRAD, 1, 2, 1, torch.zeros(4, 3)))
    with pytest.raises(WireViolation, match="a second grad"):
        guard.check(Message(Kind.GRAD, last - 2, 2, 1, torch.zeros(4, 3)))


@pytest.mark.parametrize(
    ("msg", "complaint"),
    [
        (Message(Kind.GRAD, 0, 2, 1, torch.zeros(4, 4)), r"is not float32\(4, 3\)"),
        (Message(Kind.GRAD, 0, 2, 1, torch.zeros(4, 3, dtype=torch.float64)), "is not float32"),
        (Message(Kind.GRAD, 0, 2, 1, torch.zeros(4, 3), torch.zeros(4)), "must not carry labels"),
        (Message(Kind.GRAD, 0, 0, 1, torch.zeros(4, 3)), "addressed 0->1"),
    ],
)
def test_tensors_must_fit_the_stream(msg: Message, complaint: str) -> None:
    guard, sent = _guard(DOWN)
    sent.newest = 5
    with pytest.raises(WireViolation, match=complaint):
        guard.check(msg)


def test_streams_larger_than_the_message_limit_are_refused_when_the_transport_starts() -> None:
    big = Stream(0, 1, False, (1024, 1024))
    with pytest.raises(WireViolation, match=r"exceed dist.max_message_bytes=1048576"):
        InProcessTransport(InProcessHub(), 1, [big], [], max_message_bytes=1 << 20)


def test_a_bad_message_on_an_in_process_wire_fails_the_receiver() -> None:
    """The receive loop checks what every wire delivers (here: a duplicate target)."""
    hub = InProcessHub()
    low = InProcessTransport(hub, 1, [DOWN], [OUT])
    low.start()
    try:
        low.send(Message(Kind.ACTIVATION, 0, 1, 2, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)))
        low.expect(2, 2)
        wire = hub.wire(2, 1)
        wire.put(Message(Kind.GRAD, 0, 2, 1, torch.zeros(4, 3)))
        wire.put(Message(Kind.GRAD, 0, 2, 1, torch.zeros(4, 3)))
        assert low.recv(timeout=10).step == 0
        with pytest.raises(TransportError, match="a second grad"):
            low.recv(timeout=10)
    finally:
        low.close()
