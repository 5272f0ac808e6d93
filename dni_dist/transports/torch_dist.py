"""Point-to-point over torch.distributed: NCCL between GPUs, gloo on CPU (or on host
copies of CUDA tensors, when stages share one GPU).

Design: one communicator per directed link, one thread per communicator end
-------------------------------------------------------------------------------
Every stream of the run (``engines/wiring.py``: activations k -> k+1, gradients k+1 -> k,
or errors top -> k for the direct-error methods DFA and Kickback) is a *link* and gets its
own two-rank process group (for NCCL, its own communicator and NCCL stream). On each end
exactly one thread drives it: the sender's send thread and the receiver's receive thread
(base.py starts one per stream). Each message is one ``batch_isend_irecv`` of header
(kind, step), payload and, going up, labels; shapes are fixed per stream, so the receiver
posts the matching batch before it knows what is coming.

Why this cannot deadlock:
- Matching is by construction. NCCL matches point-to-point ops in call order only; on a
  link only one thread per end calls, one batch per message, in the stream's order.
  No two links share a communicator, so one link's pending receive never sits in front of
  another link's send (with one group for all links, as before, a receive armed for a
  gradient blocked the send of the next activation whenever K >= 3 or a thread raced).
- No communication op touches the compute stream. On CUDA each link thread works on its
  own CUDA stream, so ``work.wait()`` (which makes the *current* stream wait for the NCCL
  kernel) stalls only that link. Compute -> send is ordered by a CUDA event recorded on the
  compute stream when the stage hands a message over and waited on by the link's stream;
  a received message carries an event recorded on the link's stream after the receive,
  which the compute stream waits on when the stage takes the message (``record_stream``
  tells the caching allocator about the cross-stream use). Nothing synchronises the device.
- Creation order: ``new_group`` is collective over the world, so every rank creates every
  link's group (also those it is not in), in one order (sorted by (src, dst)).
- Receivers are armed only for messages that will come (``expect``), and queues are
  bounded (base.py), so shutdown never waits on a receive nobody answers.

The only host read-back is the 16-byte header, read by the link's receive thread after
its own stream finished the receive: it blocks that thread, never compute (the stage loop
needs the kind and step to route a message).

Why not Ray Direct Transport (``@ray.method(tensor_transport="nccl")``, Ray 2.60)? It is
alpha; each tensor still moves per actor-method call and object ref (about 1 ms of control
plane per call here, against 0.1 ms for a gloo message), so it fits request/response, not
a free-running stream; its NCCL path goes through ``ray.util.collective`` (cupy, not
installed); and our actors are threaded (``max_concurrency=2``, for snapshots during an
epoch), which RDT's docs exclude. torch.distributed P2P is what we can make correct by
construction, and the same code runs over gloo on CPU, so CPU tests exercise it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dni_dist.core.messages import Message
from dni_dist.transports.base import CODE_KINDS, KIND_CODES, Stream, Transport
from dni_dist.transports.validate import WireViolation

Link = tuple[int, int]  # (src, dst) of one directed stream


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def link_order(streams: list[Stream]) -> list[Link]:
    """Every directed link of the run, in the one order every rank creates their groups."""
    return sorted({(s.src, s.dst) for s in streams})


def init_links(
    backend: str,
    address: str,
    port: int,
    rank: int,
    world_size: int,
    timeout_s: float,
    device: torch.device,
    streams: list[Stream],
) -> dict[Link, Any]:
    """Join the job's process group (rank 0's address and port, as Ray Train does) and
    create one group per link; every rank calls this with the same ``streams``.
    Returns the groups this rank is in."""
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(device)
    kwargs = {"device_id": device} if backend == "nccl" else {}  # NCCL: create communicators eagerly
    dist.init_process_group(
        backend,
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    groups = {}
    for link in link_order(streams):
        group = dist.new_group(list(link), backend=backend)  # collective: every rank, same order
        if rank in link:
            groups[link] = group
    return groups


@dataclass
class StampedMessage(Message):
    """A message whose tensors are ready on the device once a stream waited on ``ready``."""

    ready: Any = None  # torch.cuda.Event, or None on CPU


class TorchDistTransport(Transport):
    def __init__(
        self,
        rank: int,
        inbound: list[Stream],
        outbound: list[Stream],
        groups: dict[Link, Any],
        wire_device: torch.device,
        compute_device: torch.device,
        capacity: int = 4,
        max_message_bytes: int | None = None,
    ) -> None:
        super().__init__(rank, inbound, outbound, capacity, max_message_bytes)
        missing = [f"{s.src}->{s.dst}" for s in [*inbound, *outbound] if (s.src, s.dst) not in groups]
        if missing:
            raise ValueError(f"rank {rank}: no process group for link(s) {', '.join(missing)}")
        self.groups = groups
        self.wire_device = wire_device  # cpu for gloo, cuda for nccl
        self.compute_device = compute_device
        self.cuda = compute_device.type == "cuda"
        # One CUDA stream per link, used only by that link's thread on this rank.
        self._link_streams: dict[Link, Any] = (
            {link: torch.cuda.Stream(compute_device) for link in groups} if self.cuda else {}
        )

    @contextlib.contextmanager
    def _on_link(self, stream: Stream) -> Iterator[Any]:
        """Run this link's work on its own CUDA stream (a no-op on CPU)."""
        if not self.cuda:
            yield None
            return
        link_stream = self._link_streams[(stream.src, stream.dst)]
        torch.cuda.set_device(self.compute_device)  # the current device is per thread
        with torch.cuda.stream(link_stream):
            yield link_stream

    # ------------------------------------------------- the compute thread's side
    def _stamp_outgoing(self, msg: Message) -> Message:
        if not self.cuda:
            return msg
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.compute_device))  # after the compute that made it
        return StampedMessage(msg.kind, msg.step, msg.src, msg.dst, msg.tensor, msg.labels, ready)

    def _take_incoming(self, msg: Message) -> Message:
        ready = getattr(msg, "ready", None)
        if ready is None:
            return msg
        compute = torch.cuda.current_stream(self.compute_device)
        compute.wait_event(ready)  # on the device: the host does not wait
        msg.tensor.record_stream(compute)
        if msg.labels is not None:
            msg.labels.record_stream(compute)
        return msg

    # ------------------------------------------------------ the link threads
    def _send_one(self, stream: Stream, msg: Message) -> None:
        group = self.groups[(stream.src, stream.dst)]
        with self._on_link(stream) as link_stream:
            ready = getattr(msg, "ready", None)
            if ready is not None:
                link_stream.wait_event(ready)
            header = torch.tensor([KIND_CODES[msg.kind], msg.step], dtype=torch.long).to(self.wire_device)
            tensors = [header, self._to_wire(msg.tensor, link_stream)]
            if stream.up:
                assert msg.labels is not None
                tensors.append(self._to_wire(msg.labels, link_stream))
            ops = [dist.P2POp(dist.isend, t, stream.dst, group) for t in tensors]
            for work in dist.batch_isend_irecv(ops):
                work.wait()  # CPU: until sent; CUDA: the link stream waits, the host does not

    def _to_wire(self, tensor: torch.Tensor, link_stream: Any) -> torch.Tensor:
        tensor = tensor.detach()
        if link_stream is not None and tensor.is_cuda:
            tensor.record_stream(link_stream)  # made on the compute stream, read on this one
        return tensor.to(self.wire_device).contiguous()  # gloo from a GPU: a copy on this link's stream

    def _receive_one(self, stream: Stream) -> Message:
        group = self.groups[(stream.src, stream.dst)]
        with self._on_link(stream) as link_stream:
            header = torch.empty(2, dtype=torch.long, device=self.wire_device)
            payload = torch.empty(stream.shape, dtype=torch.float32, device=self.wire_device)
            tensors = [header, payload]
            labels = None
            if stream.up:
                labels = torch.empty(stream.labels_shape, dtype=stream.labels_dtype, device=self.wire_device)
                tensors.append(labels)
            ops = [dist.P2POp(dist.irecv, t, stream.src, group) for t in tensors]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            code, step = (int(v) for v in header.tolist())  # CUDA: waits for this link's stream only
            payload = payload.to(self.compute_device, non_blocking=True)
            labels = None if labels is None else labels.to(self.compute_device, non_blocking=True)
            ready = None
            if link_stream is not None:
                ready = torch.cuda.Event()
                ready.record(link_stream)
        if code not in CODE_KINDS:  # the rest is checked in the receive loop (validate.py)
            raise WireViolation(f"stream {stream.name}: step {step}: header kind code {code} is not a message kind")
        return StampedMessage(CODE_KINDS[code], step, stream.src, stream.dst, payload, labels, ready)


def shutdown_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
