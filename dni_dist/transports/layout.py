"""One message as one fixed byte buffer: the (kind, step) header, the payload, the labels.

Every stream's shapes are fixed for the run (transports/base.py), so a message packs into
a buffer whose layout both ends know before it arrives: one send and one receive per
message (torch.distributed point-to-point), or one slot of a shared-memory ring (shm.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dni_dist.core.messages import Stream

Link = tuple[int, int]  # (src, dst) of one directed stream
HEADER_BYTES = 16  # (kind, step) as two int64


@dataclass(frozen=True)
class Layout:
    """One message as one byte buffer: the (kind, step) header, the payload, the labels
    (8-byte aligned); fixed per stream, so one send and one receive per message."""

    link: Link
    shape: tuple[int, ...]
    dtype: torch.dtype
    labels_shape: tuple[int, ...]
    labels_dtype: torch.dtype
    labels_at: int
    nbytes: int

    @classmethod
    def of(cls, stream: Stream) -> Layout:
        dtype = stream.dtype  # the stages' precision
        payload_bytes = math.prod(stream.shape) * dtype.itemsize
        labels_at = HEADER_BYTES + -(-payload_bytes // 8) * 8
        labels_bytes = math.prod(stream.labels_shape) * stream.labels_dtype.itemsize if stream.up else 0
        return cls(
            (stream.src, stream.dst),
            stream.shape,
            dtype,
            stream.labels_shape,
            stream.labels_dtype,
            labels_at,
            labels_at + labels_bytes,
        )

    def header(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[:HEADER_BYTES].view(torch.long)

    def payload(self, buffer: torch.Tensor) -> torch.Tensor:
        end = HEADER_BYTES + math.prod(self.shape) * self.dtype.itemsize
        return buffer[HEADER_BYTES:end].view(self.dtype).view(self.shape)

    def labels(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[self.labels_at : self.nbytes].view(self.labels_dtype).view(self.labels_shape)
