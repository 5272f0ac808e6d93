"""The gRPC wire: the .proto is the contract, stubs are current, frames are checked."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from dni_dist.core.messages import Kind, Message
from dni_dist.transports.base import Stream
from dni_dist.transports.grpc_transport import GrpcTransport
from dni_dist.wire import dni_pb2 as pb
from dni_dist.wire.codec import Assembler, WireError, message_frames

REPO = Path(__file__).resolve().parents[1]
UP = Stream(0, 1, True, (8, 5), (8,))
DOWN = Stream(1, 0, False, (8, 5))


def test_checked_in_stubs_are_current_with_the_proto() -> None:
    check = subprocess.run([sys.executable, "-m", "dni_dist.wire.generate", "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_messages_are_chunked_and_reassembled_exactly() -> None:
    stream = Stream(2, 3, False, (300, 1000))  # 1.2 MB: two chunks of 1 MiB at most
    x = torch.randn(300, 1000)
    frames = list(message_frames(Message(Kind.BOOTSTRAP, 7, 2, 3, x), chunk_bytes=1 << 20))
    assert [f.gradient.tensor.chunk_index for f in frames] == [0, 1]
    assembler = Assembler(stream)
    assert assembler.feed(frames[0]) is None
    msg = assembler.feed(frames[1])
    assert msg.kind is Kind.BOOTSTRAP and msg.step == 7 and torch.equal(msg.tensor, x)


@pytest.mark.parametrize(
    ("mutate", "complaint"),
    [
        (lambda f: f.gradient.tensor.shape.__setitem__(0, 9), "is not float32"),
        (lambda f: setattr(f.gradient.tensor, "dtype", "int64"), "is not float32"),
        (lambda f: setattr(f.gradient.tensor, "chunk_index", 1), "expected 0"),
        (lambda f: setattr(f.gradient.tensor, "data", f.gradient.tensor.data[:-4]), "bytes for a tensor"),
        (lambda f: setattr(f.gradient, "kind", pb.KIND_ACTIVATION), "not a gradient kind"),
        (lambda f: setattr(f.gradient, "step", -3), "negative"),
    ],
)
def test_frames_that_do_not_fit_the_stream_are_refused(mutate, complaint: str) -> None:
    (frame,) = message_frames(Message(Kind.GRAD, 1, 1, 0, torch.zeros(8, 5)))
    mutate(frame)
    with pytest.raises(WireError, match=complaint):
        Assembler(DOWN).feed(frame)


def _pair(run_a: str = "run", run_b: str = "run") -> tuple[GrpcTransport, GrpcTransport]:
    a = GrpcTransport(0, [DOWN], [UP], run_a, capacity=2)
    b = GrpcTransport(1, [UP], [DOWN], run_b, capacity=2)
    return a, b


def test_a_stream_from_another_run_is_refused() -> None:
    from dni_dist.transports.base import TransportError

    a, b = _pair("run-1", "run-2")
    try:
        with pytest.raises(TransportError, match="run id 'run-1' is not this run's"):
            a.connect({1: b.address})
    finally:
        a.close()
        b.close()


def test_a_slow_receiver_holds_the_sender_back() -> None:
    a, b = _pair()
    a.connect({1: b.address})
    b.connect({0: a.address})
    a.start()
    b.start()
    sent: list[int] = []

    def produce() -> None:
        for step in range(50):
            a.send(Message(Kind.ACTIVATION, step, 0, 1, torch.zeros(8, 5), torch.zeros(8, dtype=torch.long)))
            sent.append(step)

    producer = threading.Thread(target=produce, daemon=True)
    try:
        producer.start()
        producer.join(timeout=2.0)
        # Nobody receives: the ack window and the bounded queues stop the sender early.
        assert producer.is_alive() and len(sent) <= 12
        b.expect(0, 50)
        assert [b.recv(timeout=10).step for _ in range(50)] == list(range(50))
        producer.join(timeout=10)
        assert not producer.is_alive()
    finally:
        a.close()
        b.close()


INDEPENDENT_CLIENT = textwrap.dedent(
    """
    import sys
    import grpc
    import numpy as np
    import dni_pb2 as pb
    import dni_pb2_grpc as rpc

    address, run_id = sys.argv[1], sys.argv[2]
    spec = [pb.TensorSpec(name="payload", dtype="float32", shape=[8, 5]),
            pb.TensorSpec(name="labels", dtype="int64", shape=[8])]
    hello = pb.Handshake(protocol_version=pb.VERSION_1, run_id=run_id, src_stage=0, dst_stage=1, up=True, tensors=spec)
    payload = np.arange(40, dtype=np.float32).reshape(8, 5)
    labels = np.arange(8, dtype=np.int64)
    frames = [
        pb.Frame(handshake=hello),
        pb.Frame(activation=pb.Activation(
            step=0,
            tensor=pb.Tensor(dtype="float32", shape=[8, 5], data=payload.tobytes(), chunk_index=0, chunk_count=1),
            labels=pb.Tensor(dtype="int64", shape=[8], data=labels.tobytes(), chunk_count=1))),
    ]
    with grpc.insecure_channel(address) as channel:
        ack = rpc.StageStub(channel).Push(iter(frames), timeout=30)
    print(ack.ok, ack.step)
    """
)


def test_a_client_generated_independently_from_the_proto_talks_to_a_stage(tmp_path) -> None:
    from grpc_tools import protoc

    proto_dir = REPO / "proto"
    assert (
        protoc.main(
            [
                "protoc",
                f"-I{proto_dir}",
                f"--python_out={tmp_path}",
                f"--grpc_python_out={tmp_path}",
                str(proto_dir / "dni.proto"),
            ]
        )
        == 0
    )
    (tmp_path / "client.py").write_text(INDEPENDENT_CLIENT)
    stage = GrpcTransport(1, [UP], [], "contract-run")
    stage.start()
    stage.expect(0, 1)
    try:
        client = subprocess.run(
            [sys.executable, "client.py", stage.address, "contract-run"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout.split() == ["True", "0"]
        msg = stage.recv(timeout=10)
        assert msg.kind is Kind.ACTIVATION and msg.step == 0
        torch.testing.assert_close(msg.tensor, torch.arange(40, dtype=torch.float32).view(8, 5))
        assert msg.labels.tolist() == list(range(8))
    finally:
        stage.close()
