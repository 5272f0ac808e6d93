"""Which streams connect which stages, and the tensor shapes each one carries."""

from __future__ import annotations

import torch

from dni_dist.core.tasks import Task
from dni_dist.transports.base import Stream


def all_streams(
    num_stages: int,
    cut_shapes: list[tuple[int, ...]],
    batch_size: int,
    task: Task,
    direct_error: bool,
    dtype: torch.dtype = torch.float32,
) -> list[Stream]:
    """Activations go up k -> k+1; targets come down k+1 -> k, or top -> k for a direct error;
    every payload in ``dtype`` (the stages' precision)."""
    labels_shape = (batch_size, *task.label_shape)
    top = num_stages - 1
    streams = []
    for k in range(top):
        shape = (batch_size, *cut_shapes[k])
        streams.append(Stream(k, k + 1, True, shape, labels_shape, task.label_dtype, dtype))
        if direct_error:
            streams.append(Stream(top, k, False, (batch_size, *task.output_shape), dtype=dtype))
        else:
            streams.append(Stream(k + 1, k, False, shape, dtype=dtype))
    return streams


def streams_of(rank: int, streams: list[Stream]) -> tuple[list[Stream], list[Stream]]:
    """(inbound, outbound) streams of one stage."""
    return [s for s in streams if s.dst == rank], [s for s in streams if s.src == rank]
