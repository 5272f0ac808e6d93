"""Point-to-point over torch.distributed: NCCL between GPUs, gloo on CPU (or on host
copies of CUDA tensors, when stages share one GPU: gloo point-to-point takes CPU tensors).

Design: one communicator per directed link, one thread per communicator end
---------------------------------------------------------------------------
Every stream of the run (``engines/wiring.py``: activations k -> k+1, gradients k+1 -> k,
or errors top -> k for the direct-error methods DFA and Kickback) is a *link* and gets its
own two-rank process group (for NCCL, its own communicator and NCCL stream). On each end
exactly one thread drives it. On a GPU: the link's send thread on the sender, the link's
receive thread on the receiver (base.py starts one per stream). On the CPU the stage's own
thread sends: it posts each send with ``isend`` and goes on without waiting (``_post``:
gloo's thread sends it; at most ``capacity`` sends outstanding per link, their buffers
reused); and a stage with one inbound stream receives on its own thread too, receives posted
ahead for the messages it expects (``_take``); a middle stage, with two, keeps a receive
thread per stream. Each message is one buffer packing header (kind, step), payload and,
going up, labels (``Layout``): one ``isend``, one ``irecv``, instead of three of each. Shapes
are fixed per stream, so the receiver posts the matching receive before it knows what comes.

Sends from the stage's thread were first tried *waiting* for each send: 10.3 ms/step against
6.2-6.6 ms/step with send threads (``dni-dist bench overhead``, digits K=2). Posted without
waiting, a message costs the stage a copy and a call instead of a queue hand-off and a thread
wake-up on its own core: Ray/local 1.25x against 1.15x with send threads, 1.27-1.31x with the
receives on the stage's thread too (benchmarks/RESULTS.md, "Issue 14, third round"). On a GPU
the link threads stay: they order the transfers after the compute with CUDA events.

Why this cannot deadlock:
- Matching is by construction. NCCL matches point-to-point ops in call order only; on a
  link one thread per end calls, one op per message, in the stream's order. No two links
  share a communicator, so a pending receive on one link never sits in front of a send on
  another (with one group for every link, as before, a receive armed for a gradient
  blocked the send of the next activation, and threads raced on one communicator).
- No communication op runs on the compute stream. On CUDA each link's ops run on the
  link's own CUDA stream, so ``work.wait()`` (which makes the *current* stream wait for
  the NCCL kernel) stalls only that link. Compute -> send is ordered by a CUDA event
  recorded on the compute stream when the stage hands a message over, which the link's
  stream waits on; a received message carries an event recorded on the link's stream
  after the receive, which the compute stream waits on when the stage takes it
  (``record_stream`` tells the caching allocator about the cross-stream use). Nothing
  synchronises the device; headers go through pinned memory both ways. Link streams come
  from torch's high-priority stream pool, apart from the low-priority pool NCCL's own
  streams come from (two links sharing a stream could hold each other up), and are checked
  to be distinct.
- Creation order: ``new_group`` is collective over the world, so every rank creates every
  link's group (also those it is not in), in one order (sorted by (src, dst)); then each
  rank sends or receives one tiny message per link of its own, in that order, on one
  thread (``warm_links``), so NCCL's point-to-point communicators, made at a pair's first
  message, all exist before the link threads use them concurrently.
- Bounded on the device: an NCCL send's host-side ``wait`` returns at once, so each link
  keeps an event per send still running and its send thread waits for the oldest beyond
  ``capacity`` of them; ``flush`` waits for all of them.
- Receivers are armed only for messages that will come (``expect``), and queues are
  bounded (base.py), so shutdown never waits on a receive nobody answers.

The only host read-back is the 16-byte header, copied to pinned memory on the link's
stream after the receive and read once that copy's event completes: it blocks the link's
receive thread, never compute (the stage loop needs the kind and step to route a message).
Tested over gloo on CPU (K=4, every method: tests/test_link_groups.py); NCCL itself needs a
GPU per rank and has not run here.

Why not Ray Direct Transport (``@ray.method(tensor_transport="nccl")``, Ray 2.60)? It is
alpha; each tensor moves per actor-method call and object ref (about 1 ms of control
plane per call here, against 0.1 ms for a gloo message), which fits request and response,
not a free-running stream; its collective path goes through ``ray.util.collective`` (NCCL
there needs cupy, not installed); and our actors are threaded (``max_concurrency=2``, for
snapshots during an epoch), which RDT excludes. torch.distributed P2P can be made correct
by construction, and the same code runs over gloo, so CPU tests exercise it.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import socket
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from dni_dist.core.messages import Message, message_bytes
from dni_dist.transports.base import CODE_KINDS, KIND_CODES, Stream, Transport
from dni_dist.transports.errors import TransportError, TransportTimeout
from dni_dist.transports.layout import Layout, Link
from dni_dist.transports.validate import WireViolation


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
    warm_links(groups, rank, device if backend == "nccl" else torch.device("cpu"))
    return groups


def warm_links(groups: dict[Link, Any], rank: int, device: torch.device) -> None:
    """One tiny message over each of this rank's links, in link order, on this one thread,
    before any link thread starts. NCCL creates a point-to-point communicator at a pair's
    first send or receive, a blocking step that both ranks must reach; made here, every
    communicator exists before link threads drive several of them concurrently (NCCL asks
    concurrent communicators to be created and used in an order every rank agrees on), and
    none is created in a link thread while another link's kernels run. Blocking exchanges in
    one global order cannot wait on each other in a cycle: the first unfinished link in that
    order has both its ranks at it."""
    for link in sorted(groups):
        token = torch.zeros(1, device=device)
        if link[0] == rank:
            dist.send(token, link[1], group=groups[link])
        else:
            dist.recv(token, link[0], group=groups[link])
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # setup, once: every warm-up message has landed


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
        self.nccl = wire_device.type == "cuda"
        # One CUDA stream per link, used only by that link's one thread on this rank.
        self._link_streams: dict[Link, Any] = _link_streams(list(groups), compute_device) if self.cuda else {}
        # NCCL: an event per send still running on the device, oldest first, per link. The
        # host-side ``wait`` of an NCCL send returns at once, so without these neither the
        # outbox bound nor ``flush`` would mean the message left: each link keeps at most
        # ``capacity`` sends (and their buffers) in flight on the device.
        self._device_sends: dict[Link, deque[Any]] = {link: deque() for link in groups} if self.nccl else {}
        # On the CPU the stage's thread posts its sends itself (see _post): no send thread.
        self.inline_sends = not self.cuda
        self._sending = {s.dst: _SendLink(s, groups[(s.src, s.dst)]) for s in outbound} if self.inline_sends else {}
        # ... and, with one stream to listen to, its receives too (see _take); with several
        # (a middle stage), a receive thread per stream waits on each, as on a GPU.
        self.inline_receives = not self.cuda and len(inbound) == 1
        self._receiving = (
            {s.src: _ReceiveLink(s, groups[(s.src, s.dst)]) for s in inbound} if self.inline_receives else {}
        )

    # ------------------------------ the CPU's links, driven by the stage's thread
    def start(self) -> None:
        if not self.inline_sends:
            super().start()
            return
        if not self.inline_receives:
            for src, stream in self.inbound.items():
                self._spawn(self._receive_loop, stream, self._armed[src], name=f"recv {stream.name}")

    def expect(self, src: int, count: int) -> None:
        if not self.inline_receives:
            super().expect(src, count)
            return
        link = self._receiving[src]
        link.armed += count
        self._post_receives(link)

    def _post_receives(self, link: _ReceiveLink) -> None:
        """Keep up to ``capacity`` receives posted for messages that will come (never one
        nobody will answer: only as many as were expected), so the sender's sends finish
        while this stage computes."""
        while link.armed and len(link.posted) < self.capacity:
            buffer = torch.empty(link.layout.nbytes, dtype=torch.uint8)
            link.posted.append((dist.irecv(buffer, link.stream.src, group=link.group), buffer))
            link.armed -= 1

    def try_recv(self) -> Message | None:
        if not self.inline_receives:
            return super().try_recv()
        (link,) = self._receiving.values()
        if link.posted and link.posted[0][0].is_completed():
            return self._take(link, None)
        return None

    def recv(self, timeout: float) -> Message:
        if not self.inline_receives:
            return super().recv(timeout)
        (link,) = self._receiving.values()
        if not link.posted:
            time.sleep(timeout)  # nothing expected: nothing can come
            raise TransportTimeout(f"rank {self.rank}: nothing arrived for {timeout:.0f} s")
        return self._take(link, timeout)

    def _take(self, link: _ReceiveLink, timeout: float | None) -> Message:
        """The oldest posted receive's message (waiting up to ``timeout`` seconds for it),
        checked against its stream; then the next receive is posted."""
        work, buffer = link.posted[0]
        try:
            work.wait() if timeout is None else work.wait(datetime.timedelta(seconds=timeout))
        except RuntimeError as exc:
            if "imed out" in str(exc):
                raise TransportTimeout(f"rank {self.rank}: nothing arrived for {timeout:.0f} s") from None
            raise TransportError(f"rank {self.rank}: receive from stage {link.stream.src} failed: {exc}") from exc
        link.posted.popleft()
        msg = _unpack(link.stream, link.layout, buffer, None)
        self._admit(link.stream, msg)
        self.stats.add(False, message_bytes(msg))
        self._post_receives(link)
        return msg

    def send(self, msg: Message) -> None:
        if not self.inline_sends:
            super().send(msg)
            return
        link = self._sending.get(msg.dst)
        if link is None:
            raise TransportError(f"rank {self.rank} has no stream to stage {msg.dst} for a {msg.kind.value}")
        self._check()
        self._sent_steps.record(msg)  # before it leaves: a reply can only follow this
        self._post(link, msg)

    def _post(self, link: _SendLink, msg: Message) -> None:
        """Pack ``msg`` into a free buffer of its link and post it with ``isend``, without
        waiting: gloo's own thread sends it. At most ``capacity`` sends are outstanding per
        link; one more waits for the oldest (a slow receiver pushes back, memory stays
        bounded). A finished send's buffer is used again, so a message costs a copy and a
        call, not an allocation, three views and two thread hand-offs."""
        self._reap(link, wait_for_one=len(link.pending) >= self.capacity)
        slot = link.free.pop() if link.free else _Slot.of(link.layout)
        slot.header[0], slot.header[1] = KIND_CODES[msg.kind], msg.step
        slot.payload.copy_(msg.tensor.detach())
        if slot.labels is not None:
            assert msg.labels is not None
            slot.labels.copy_(msg.labels)
        work = dist.isend(slot.buffer, link.stream.dst, group=link.group)
        link.pending.append((work, slot, message_bytes(msg)))

    def _reap(self, link: _SendLink, wait_for_one: bool = False, deadline: float | None = None) -> None:
        """Take back the buffers of finished sends (waiting for the oldest if asked, or for
        all of them until ``deadline``)."""
        while link.pending:
            work, slot, nbytes = link.pending[0]
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportTimeout(f"rank {self.rank}: stream to {link.stream.dst} did not drain in time")
                self._wait(link, work, datetime.timedelta(seconds=left))
            elif wait_for_one:
                self._wait(link, work, None)
                wait_for_one = False
            elif not work.is_completed():
                return
            else:
                self._wait(link, work, None)  # finished: raises if it failed
            link.pending.popleft()
            link.free.append(slot)
            self.stats.add(True, nbytes)

    def _wait(self, link: _SendLink, work: Any, timeout: datetime.timedelta | None) -> None:
        try:
            work.wait() if timeout is None else work.wait(timeout)
        except RuntimeError as exc:
            raise TransportError(f"rank {self.rank}: send to stage {link.stream.dst} failed: {exc}") from exc

    def flush(self, timeout: float) -> None:
        if not self.inline_sends:
            deadline = time.monotonic() + timeout
            super().flush(timeout)
            for link, sends in self._device_sends.items():  # the send threads are idle now
                while sends:
                    if not sends[0].query():
                        if time.monotonic() > deadline:
                            raise TransportTimeout(f"rank {self.rank}: link {link} did not drain in {timeout:.0f} s")
                        time.sleep(0.001)
                        continue
                    sends.popleft()
            return
        deadline = time.monotonic() + timeout
        for link in self._sending.values():
            self._reap(link, deadline=deadline)

    @property
    def queued(self) -> int:
        sending = sum(len(link.pending) for link in self._sending.values())
        return super().queued + sending + sum(len(link.posted) for link in self._receiving.values())

    # ------------------------------------------------ the stage thread's side
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

    # ---------------------------------------------------------- both sides
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

    def _send_one(self, stream: Stream, msg: Message) -> None:
        """On the link's send thread: pack the message into its link's fixed layout and send
        it. gloo waits here until sent (and, carrying CUDA tensors, for the copy to the
        host); NCCL's wait, made inside the link's stream context, only makes the link's
        stream wait (outside it, it would hold up the compute stream)."""
        layout = Layout.of(stream)
        with self._on_link(stream) as link_stream:
            ready = getattr(msg, "ready", None)
            if ready is not None:
                link_stream.wait_event(ready)
            buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.wire_device)
            # Pinned for NCCL, so the 16-byte copy is queued, never a wait on the link stream.
            header = torch.empty(2, dtype=torch.long, pin_memory=self.nccl)
            header[0], header[1] = KIND_CODES[msg.kind], msg.step
            layout.header(buffer).copy_(header, non_blocking=True)
            sources = [msg.tensor.detach()] + ([msg.labels] if stream.up and msg.labels is not None else [])
            if link_stream is not None:
                for source in sources:  # made on the compute stream, read on this one
                    if source.is_cuda:
                        source.record_stream(link_stream)
            layout.payload(buffer).copy_(sources[0], non_blocking=self.nccl)
            if stream.up:
                assert msg.labels is not None
                layout.labels(buffer).copy_(msg.labels, non_blocking=self.nccl)
            dist.isend(buffer, stream.dst, group=self.groups[layout.link]).wait()
            if self.nccl:
                sent = torch.cuda.Event()
                sent.record(link_stream)  # after the link stream's wait on the NCCL send
                sends = self._device_sends[layout.link]
                sends.append(sent)
                if len(sends) > self.capacity:  # this link thread waits, never the compute
                    sends.popleft().synchronize()

    def _receive_one(self, stream: Stream) -> Message:
        layout = Layout.of(stream)
        with self._on_link(stream) as link_stream:
            buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.wire_device)
            # CPU: until received; CUDA: the link stream waits, the host does not.
            dist.irecv(buffer, stream.src, group=self.groups[layout.link]).wait()
            msg = _unpack(stream, layout, buffer, self.compute_device)
            if link_stream is not None:
                msg.ready = torch.cuda.Event()
                msg.ready.record(link_stream)
        return msg


def _read_header(header: torch.Tensor) -> tuple[int, int]:
    """(kind code, step) of a received header. On a GPU: copied into pinned memory on the
    current (link) stream, then the host waits for that copy's event only: not a pageable
    read-back (``tolist`` on a CUDA tensor is a blocking memcpy, the pattern behind NCCL
    init deadlocks across threads, and a sync ``set_sync_debug_mode`` counts)."""
    if not header.is_cuda:
        code, step = header.tolist()
        return int(code), int(step)
    host = torch.empty(2, dtype=torch.long, pin_memory=True)
    host.copy_(header, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    copied.synchronize()
    code, step = host.tolist()
    return int(code), int(step)


def _unpack(stream: Stream, layout: Layout, buffer: torch.Tensor, device: torch.device | None) -> StampedMessage:
    """The message in a received ``buffer``; its tensors are views of it, moved to
    ``device`` (None: left where they are). CUDA: reading the header waits for this link only."""
    code, step = _read_header(layout.header(buffer))
    if code not in CODE_KINDS:  # the rest is checked in the receive loop (validate.py)
        raise WireViolation(f"stream {stream.name}: step {step}: header kind code {code} is not a message kind")
    payload = layout.payload(buffer)
    labels = layout.labels(buffer) if stream.up else None
    if device is not None:
        payload = payload.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True) if labels is not None else None
    return StampedMessage(CODE_KINDS[code], step, stream.src, stream.dst, payload, labels)


@dataclass
class _Link:
    """One end of a link driven by the stage's own thread (CPU): its stream, its process
    group and its messages' fixed layout."""

    stream: Stream
    group: Any
    layout: Layout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = Layout.of(self.stream)


@dataclass
class _ReceiveLink(_Link):
    """The one link a stage listens to: receives posted for expected messages (work,
    buffer), oldest first, and how many more are expected."""

    posted: deque[tuple[Any, torch.Tensor]] = field(default_factory=deque)
    armed: int = 0


@dataclass
class _Slot:
    """One reusable send buffer of a link and its views. The header is written through a
    ctypes view of the buffer's first 16 bytes: two stores, no torch call per message."""

    buffer: torch.Tensor
    header: Any  # ctypes c_int64 * 2 over buffer[:16]; valid while ``buffer`` lives (it is held here)
    payload: torch.Tensor
    labels: torch.Tensor | None

    @classmethod
    def of(cls, layout: Layout) -> _Slot:
        buffer = torch.empty(layout.nbytes, dtype=torch.uint8)
        header = (ctypes.c_int64 * 2).from_address(buffer.data_ptr())
        labels = layout.labels(buffer) if layout.labels_at < layout.nbytes else None
        return cls(buffer, header, layout.payload(buffer), labels)


@dataclass
class _SendLink(_Link):
    """A link this rank sends on: its sends still in flight (work, buffer, bytes), oldest
    first, and the buffers free to use again."""

    pending: deque[tuple[Any, _Slot, int]] = field(default_factory=deque)
    free: list[_Slot] = field(default_factory=list)


def _link_streams(links: list[Link], device: torch.device) -> dict[Link, Any]:
    """A CUDA stream per link. torch hands out streams round-robin from fixed pools (32 per
    priority); ProcessGroupNCCL takes its internal streams from the low-priority pool, so
    ours come from the high-priority one, where they never alias an NCCL stream (a receive
    waiting on a shared stream would hold up another link's send). They must not alias each
    other either: a rank with more links than the pool holds is refused in one line."""
    streams = {link: torch.cuda.Stream(device, priority=-1) for link in links}
    if len({s.cuda_stream for s in streams.values()}) < len(streams):
        raise TransportError(
            f"{len(links)} links on one rank share CUDA streams (torch's pool holds 32 per priority); "
            "use fewer segments, or a method other than dfa and kickback (their top stage has a link to every stage)"
        )
    return streams


def shutdown_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
