"""Point-to-point over torch.distributed: NCCL between GPUs, gloo on CPU (or on host
copies of CUDA tensors, when stages share one GPU).

NCCL matches messages between a pair in call order only (it ignores tags), so the up
stream (activations) and the down stream (gradients, errors) each get their own process
group: a stage can send down and receive from above at the same time without the two
interleaving on one channel. Each message is a fixed-size (kind, step) header, the
payload, and for activations the labels; shapes are fixed per stream (see base.py).
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from dni_dist.core.messages import Message
from dni_dist.transports.base import CODE_KINDS, KIND_CODES, Stream, Transport
from dni_dist.transports.validate import WireViolation


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def init_groups(
    backend: str, address: str, port: int, rank: int, world_size: int, timeout_s: float, device: torch.device
) -> tuple[object, object]:
    """Join the job's process group (rank 0's address and port, as Ray Train does) and
    create the up and down groups; every rank calls this with the same arguments."""
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    kwargs = {"device_id": device} if backend == "nccl" else {}  # NCCL: create communicators eagerly
    dist.init_process_group(
        backend,
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    up = dist.new_group(list(range(world_size)), backend=backend)
    down = dist.new_group(list(range(world_size)), backend=backend)
    return up, down


class TorchDistTransport(Transport):
    def __init__(
        self,
        rank: int,
        inbound: list[Stream],
        outbound: list[Stream],
        up_group: object,
        down_group: object,
        wire_device: torch.device,
        compute_device: torch.device,
        capacity: int = 4,
        max_message_bytes: int | None = None,
    ) -> None:
        super().__init__(rank, inbound, outbound, capacity, max_message_bytes)
        self.up_group = up_group
        self.down_group = down_group
        self.wire_device = wire_device  # cpu for gloo, cuda for nccl
        self.compute_device = compute_device

    def _group(self, stream: Stream) -> object:
        return self.up_group if stream.up else self.down_group

    def _sync(self) -> None:
        if self.wire_device.type == "cuda":  # NCCL work completes on a stream, not the CPU
            torch.cuda.current_stream(self.wire_device).synchronize()

    def _send_one(self, stream: Stream, msg: Message) -> None:
        group = self._group(stream)
        header = torch.tensor([KIND_CODES[msg.kind], msg.step], dtype=torch.long, device=self.wire_device)
        dist.send(header, dst=stream.dst, group=group)
        dist.send(msg.tensor.detach().to(self.wire_device).contiguous(), dst=stream.dst, group=group)
        if stream.up:
            assert msg.labels is not None
            dist.send(msg.labels.to(self.wire_device).contiguous(), dst=stream.dst, group=group)
        self._sync()

    def _receive_one(self, stream: Stream) -> Message:
        group = self._group(stream)
        header = torch.empty(2, dtype=torch.long, device=self.wire_device)
        dist.recv(header, src=stream.src, group=group)
        payload = torch.empty(stream.shape, dtype=stream.dtype, device=self.wire_device)
        dist.recv(payload, src=stream.src, group=group)
        labels = None
        if stream.up:
            labels = torch.empty(stream.labels_shape, dtype=stream.labels_dtype, device=self.wire_device)
            dist.recv(labels, src=stream.src, group=group)
        self._sync()
        code, step = (int(v) for v in header.tolist())
        if code not in CODE_KINDS:  # the rest is checked in the receive loop (validate.py)
            raise WireViolation(f"stream {stream.name}: step {step}: header kind code {code} is not a message kind")
        return Message(
            CODE_KINDS[code],
            step,
            stream.src,
            stream.dst,
            payload.to(self.compute_device),
            None if labels is None else labels.to(self.compute_device),
        )


def shutdown_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
