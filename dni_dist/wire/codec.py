"""Tensors and stage messages to and from protobuf frames, with checks on the way in.

Sending costs one copy per chunk (a protobuf ``bytes`` field owns its memory; it will not
take a view of the tensor). Receiving costs one copy per chunk, into a buffer allocated
once per message that becomes the tensor without another copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from dni_dist.core.messages import Kind, Message, Stream
from dni_dist.wire import dni_pb2 as pb

PROTOCOL_VERSION = pb.VERSION_1
CHUNK_BYTES = 1 << 20
KIND_TO_WIRE = {
    Kind.ACTIVATION: pb.KIND_ACTIVATION,
    Kind.GRAD: pb.KIND_GRAD,
    Kind.BOOTSTRAP: pb.KIND_BOOTSTRAP,
    Kind.ERROR: pb.KIND_ERROR,
}
WIRE_TO_KIND = {v: k for k, v in KIND_TO_WIRE.items()}
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "int64": torch.long,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# numpy has no bfloat16: its bytes travel through numpy as int16 and are viewed back.
_BYTES_AS = {torch.bfloat16: torch.int16}


class WireError(ValueError):
    """A frame that does not fit the negotiated stream; the message says what and why."""


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu").contiguous()
    return t.view(_BYTES_AS.get(t.dtype, t.dtype)).numpy()


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype holding a tensor of ``dtype``'s bytes."""
    return torch.empty(0, dtype=_BYTES_AS.get(dtype, dtype)).numpy().dtype


def tensor_chunks(t: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.Tensor]:
    array = _as_numpy(t)
    raw = memoryview(array).cast("B")  # a view: the only copy is into each chunk
    count = max(1, math.ceil(len(raw) / chunk_bytes))
    dtype = DTYPE_NAMES[t.dtype]
    for i in range(count):
        chunk = raw[i * chunk_bytes : (i + 1) * chunk_bytes].tobytes()
        yield pb.Tensor(dtype=dtype, shape=array.shape, data=chunk, chunk_index=i, chunk_count=count)


def whole_tensor(t: torch.Tensor) -> pb.Tensor:
    array = _as_numpy(t)
    return pb.Tensor(dtype=DTYPE_NAMES[t.dtype], shape=array.shape, data=array.tobytes(), chunk_count=1)


def message_frames(msg: Message, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.Frame]:
    for chunk in tensor_chunks(msg.tensor, chunk_bytes):
        if msg.kind is Kind.ACTIVATION:
            assert msg.labels is not None
            labels = whole_tensor(msg.labels) if chunk.chunk_index == 0 else None
            yield pb.Frame(activation=pb.Activation(step=msg.step, tensor=chunk, labels=labels))
        else:
            yield pb.Frame(gradient=pb.Gradient(step=msg.step, kind=KIND_TO_WIRE[msg.kind], tensor=chunk))


def handshake(stream: Stream, run_id: str) -> pb.Frame:
    specs = [pb.TensorSpec(name="payload", dtype=DTYPE_NAMES[stream.dtype], shape=stream.shape)]
    if stream.up:
        specs.append(pb.TensorSpec(name="labels", dtype=DTYPE_NAMES[stream.labels_dtype], shape=stream.labels_shape))
    return pb.Frame(
        handshake=pb.Handshake(
            protocol_version=PROTOCOL_VERSION,
            run_id=run_id,
            src_stage=stream.src,
            dst_stage=stream.dst,
            up=stream.up,
            tensors=specs,
        )
    )


def check_handshake(frame: pb.Frame, expected: dict[int, Stream], rank: int, run_id: str) -> Stream:
    """The stream a handshake opens, or WireError saying why it is refused."""
    if frame.WhichOneof("body") != "handshake":
        raise WireError("the first frame of a stream must be a handshake")
    h = frame.handshake
    if h.protocol_version != PROTOCOL_VERSION:
        raise WireError(
            f"protocol version {h.protocol_version} is not supported (this stage speaks {PROTOCOL_VERSION})"
        )
    if h.run_id != run_id:
        raise WireError(f"run id {h.run_id!r} is not this run's")
    if h.dst_stage != rank or h.src_stage not in expected:
        raise WireError(f"stage {rank} has no stream from stage {h.src_stage} to stage {h.dst_stage}")
    stream = expected[h.src_stage]
    want = handshake(stream, run_id).handshake
    if h.up != want.up or list(h.tensors) != list(want.tensors):
        raise WireError(f"stream {stream.name}: offered tensors {list(h.tensors)} differ from {list(want.tensors)}")
    return stream


class Assembler:
    """Collects one stream's frames into messages, checking each against the stream."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._buffer: np.ndarray | None = None
        self._raw: memoryview | None = None
        self._offset = 0
        self._expect_index = 0
        self._count = 0
        self._step = -1
        self._labels: torch.Tensor | None = None
        self._kind = Kind.ACTIVATION

    def feed(self, frame: pb.Frame) -> Message | None:
        body = frame.WhichOneof("body")
        if body not in ("activation", "gradient") or (body == "activation") != self.stream.up:
            raise WireError(f"stream {self.stream.name} does not carry {body or 'empty'} frames")
        part = frame.activation if body == "activation" else frame.gradient
        chunk = part.tensor
        if chunk.chunk_index != self._expect_index:
            raise WireError(f"step {part.step}: chunk {chunk.chunk_index} arrived, expected {self._expect_index}")
        if chunk.chunk_index == 0:
            self._start(part, body)
        elif part.step != self._step:
            raise WireError(f"chunk of step {part.step} inside step {self._step}")
        elif chunk.chunk_count != self._count:
            raise WireError(f"step {part.step}: chunk_count changed from {self._count} to {chunk.chunk_count}")
        want = DTYPE_NAMES[self.stream.dtype]
        if chunk.dtype != want or tuple(chunk.shape) != self.stream.shape:
            got = f"{chunk.dtype}{tuple(chunk.shape)}"
            raise WireError(f"step {part.step}: tensor {got} is not {want}{self.stream.shape}")
        assert self._raw is not None
        if not chunk.data and len(self._raw):
            raise WireError(f"step {part.step}: chunk {chunk.chunk_index} carries no bytes")
        end = self._offset + len(chunk.data)
        if end > len(self._raw):
            raise WireError(f"step {part.step}: more bytes than a {self.stream.shape} tensor holds")
        self._raw[self._offset : end] = chunk.data
        self._offset = end
        self._expect_index += 1
        if self._expect_index < self._count:
            return None
        if self._offset != len(self._raw):
            raise WireError(f"step {part.step}: {self._offset} bytes for a tensor of {len(self._raw)}")
        self._expect_index = 0
        assert self._buffer is not None
        tensor = torch.from_numpy(self._buffer).view(self.stream.dtype)
        return Message(self._kind, self._step, self.stream.src, self.stream.dst, tensor, self._labels)

    @property
    def partial(self) -> bool:
        """Whether a message has begun and not ended (a stream may not stop there)."""
        return self._expect_index != 0

    def _start(self, part: pb.Activation | pb.Gradient, body: str) -> None:
        # Step order and duplicates are the stream guard's job (transports/validate.py).
        if part.step < 0:
            raise WireError(f"step {part.step} is negative")
        self._buffer = np.empty(self.stream.shape, dtype=_numpy_dtype(self.stream.dtype))
        self._raw = memoryview(self._buffer).cast("B")
        # Every chunk but that of an empty tensor carries bytes, so a tensor has at most as
        # many chunks as bytes: a peer cannot keep a stream waiting on empty chunks.
        if not 1 <= part.tensor.chunk_count <= max(1, len(self._raw)):
            raise WireError(f"step {part.step}: chunk_count {part.tensor.chunk_count} is out of range")
        self._count = part.tensor.chunk_count
        self._step = part.step
        self._offset = 0
        if body == "gradient":
            if part.kind not in WIRE_TO_KIND or part.kind == pb.KIND_ACTIVATION:
                raise WireError(f"step {part.step}: kind {part.kind} is not a gradient kind")
            self._kind = WIRE_TO_KIND[part.kind]
            self._labels = None
            return
        self._kind = Kind.ACTIVATION
        self._labels = self._labels_of(part)

    def _labels_of(self, part: pb.Activation) -> torch.Tensor:
        labels = part.labels
        want_dtype = DTYPE_NAMES[self.stream.labels_dtype]
        if labels.dtype != want_dtype or tuple(labels.shape) != self.stream.labels_shape:
            got = f"{labels.dtype}{tuple(labels.shape)}"
            raise WireError(f"step {part.step}: labels {got} are not {want_dtype}{self.stream.labels_shape}")
        dtype = np.dtype(want_dtype)
        if len(labels.data) != math.prod(self.stream.labels_shape) * dtype.itemsize:
            raise WireError(
                f"step {part.step}: labels hold {len(labels.data)} bytes, expected {self.stream.labels_shape}"
            )
        array = np.frombuffer(labels.data, dtype=dtype)
        return torch.from_numpy(array.reshape(self.stream.labels_shape).copy())
