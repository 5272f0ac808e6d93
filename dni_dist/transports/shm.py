"""Shared memory between stages on one machine (``transport=shm``), CPU tensors on the wire.

Each link (one directed stream) is a ring of ``capacity`` slots in a file mapped by both
ends (``/dev/shm`` where it exists), each slot one message in the stream's fixed layout
(layout.py), and two FIFOs: *data* (one byte per message written, sender to receiver) and
*credit* (one byte per slot read and free again, receiver to sender). The sender writes a
slot, then a data byte; the receiver reads a data byte, copies the slot out, then writes a
credit byte. The FIFO system calls order the slot's bytes between the two processes on
any CPU, so no atomics are needed; a byte per message keeps each write atomic and a
FIFO never fills (at most ``capacity`` bytes are ever in one).

Why: on the 2-core machine a 64 KiB message and its reply took 400-750 us over gloo (its
TCP loopback and its own threads, which need a core the stages are computing on) and
130-160 us this way, with a quarter to a fifth of the CPU (benchmarks/RESULTS.md, "Issue
14, sixth round"). The stage's own thread does everything: no transport threads.

Semantics as every transport's (base.py): ``send`` returns once the message is in the
ring and blocks only while the ring is full (a slow receiver holds the sender back: bounded
memory, never a drop), for at most ``timeout`` seconds; ``recv`` takes the next message of
any inbound stream. Nothing is left on disk: the sender unlinks a link's files once it has
mapped and opened them (the mapping and descriptors stay), the receiver whatever is left at
``close``. A dead peer shows as a timeout, as with gloo.

Both ends must share the machine: the Ray engine refuses ``transport=shm`` when the
placement puts stages on different nodes (engines/placement.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dni_dist.core.messages import Message, message_bytes
from dni_dist.transports.base import CODE_KINDS, KIND_CODES, Stream, Transport
from dni_dist.transports.errors import TransportError, TransportTimeout
from dni_dist.transports.layout import Layout
from dni_dist.transports.validate import WireViolation

SLOT_ALIGN = 64  # slots start on cache lines


def _base_directory() -> Path:
    """Where ring files go: memory-backed ``/dev/shm`` where the system has it."""
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))


def default_directory(run_id: str) -> Path:
    """A run's own directory for its ring files."""
    return _base_directory() / f"dni-{run_id}"


@dataclass
class _Ring:
    """One end of a link: the mapped slots, the FIFO descriptors, where this end is."""

    stream: Stream
    layout: Layout
    slots: list[torch.Tensor]  # views of the mapping, one per slot
    headers: list[ctypes.Array]  # (kind, step) of each slot, read and written without torch calls
    mapping: torch.Tensor
    signal_fd: int  # data (sender writes) or credit (receiver writes)
    wait_fd: int  # credit (sender reads) or data (receiver reads)
    paths: list[Path]
    next_slot: int = 0
    available: int = 0  # receiver: messages ready; sender: free slots


class SharedMemoryTransport(Transport):
    """Call ``create_inbound`` on every stage, then ``attach_outbound`` on every stage."""

    def __init__(
        self,
        rank: int,
        inbound: list[Stream],
        outbound: list[Stream],
        directory: Path,
        compute_device: torch.device,
        capacity: int = 4,
        timeout: float = 120.0,
        max_message_bytes: int | None = None,
    ) -> None:
        super().__init__(rank, inbound, outbound, capacity, max_message_bytes)
        self.directory = Path(directory)
        self.compute_device = compute_device
        self.timeout = timeout
        self._receiving: list[_Ring] = []
        self._sending: dict[int, _Ring] = {}
        self._turn = 0  # round robin over inbound rings, so no stream starves another

    # ------------------------------------------------------------- wiring
    def create_inbound(self) -> None:
        """Make this stage's inbound rings and FIFOs (before any sender attaches)."""
        # Too small a /dev/shm (a container's default is 64 MiB) would show only when a page of
        # a sparse file is first written, as a SIGBUS. Say so now, and reserve the pages.
        problem = room_problem(list(self.inbound.values()), self.capacity, self.directory.parent)
        if problem:
            raise TransportError(f"rank {self.rank}: {problem}")
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stream in self.inbound.values():
            ring_path, data_path, credit_path = self._paths(stream)
            layout = Layout.of(stream)
            _reserve(ring_path, _slot_bytes(layout) * self.capacity, self.rank)
            for fifo in (data_path, credit_path):
                os.mkfifo(fifo, 0o600)
            # O_RDWR: opening never waits for the other end (Linux), and the FIFO lives on.
            data = os.open(data_path, os.O_RDWR | os.O_NONBLOCK)
            credit = os.open(credit_path, os.O_RDWR)
            paths = [ring_path, data_path, credit_path]
            self._receiving.append(self._map(stream, layout, ring_path, credit, data, paths))

    def attach_outbound(self) -> None:
        """Map the rings this stage sends into (made by their receivers) and unlink them."""
        for stream in self.outbound.values():
            ring_path, data_path, credit_path = self._paths(stream)
            if not ring_path.exists():
                raise TransportError(
                    f"rank {self.rank}: no shared-memory ring for stream {stream.name} at {ring_path}: "
                    "transport=shm needs every stage on one machine"
                )
            data = os.open(data_path, os.O_RDWR)
            credit = os.open(credit_path, os.O_RDWR | os.O_NONBLOCK)
            ring = self._map(stream, Layout.of(stream), ring_path, data, credit, [])
            ring.available = self.capacity
            self._sending[stream.dst] = ring
            for path in (ring_path, data_path, credit_path):  # mapped and open: nothing to leak
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        with contextlib.suppress(OSError):
            self.directory.rmdir()  # the last one out (a receiver's files may still be there)

    def _paths(self, stream: Stream) -> tuple[Path, Path, Path]:
        stem = self.directory / f"{stream.src}-{stream.dst}"
        return stem.with_suffix(".ring"), stem.with_suffix(".data"), stem.with_suffix(".credit")

    def _map(self, stream: Stream, layout: Layout, path: Path, signal: int, wait: int, paths: list[Path]) -> _Ring:
        slot_bytes = _slot_bytes(layout)
        mapping = torch.from_file(str(path), shared=True, size=slot_bytes * self.capacity, dtype=torch.uint8)
        slots = [mapping[i * slot_bytes : i * slot_bytes + layout.nbytes] for i in range(self.capacity)]
        headers = [(ctypes.c_int64 * 2).from_address(slot.data_ptr()) for slot in slots]
        return _Ring(stream, layout, slots, headers, mapping, signal, wait, paths)

    # ---------------------------------------------------------------- API
    def start(self) -> None:  # no threads: the stage's own thread sends and receives
        pass

    def expect(self, src: int, count: int) -> None:  # nothing to post: a slot is read when it is there
        pass

    def send(self, msg: Message) -> None:
        ring = self._sending.get(msg.dst)
        if ring is None:
            raise TransportError(f"rank {self.rank} has no stream to stage {msg.dst} for a {msg.kind.value}")
        self._sent_steps.record(msg)  # before it leaves: a reply can only follow this
        if not ring.available:
            self._await(ring, self.timeout, f"stream {ring.stream.name}: the receiver took nothing")
        slot, layout = ring.slots[ring.next_slot], ring.layout
        header = ring.headers[ring.next_slot]
        header[0], header[1] = KIND_CODES[msg.kind], msg.step
        layout.payload(slot).copy_(msg.tensor.detach())
        if ring.stream.up:
            assert msg.labels is not None
            layout.labels(slot).copy_(msg.labels)
        os.write(ring.signal_fd, b"\x01")  # after the slot's bytes: the receiver may read them now
        ring.next_slot = (ring.next_slot + 1) % self.capacity
        ring.available -= 1
        self.stats.add(True, message_bytes(msg))

    def try_recv(self) -> Message | None:
        for i in range(len(self._receiving)):
            ring = self._receiving[(self._turn + i) % len(self._receiving)]
            if ring.available or _drain(ring):
                self._turn = (self._turn + i + 1) % len(self._receiving)
                return self._take(ring)
        return None

    def recv(self, timeout: float) -> Message:
        if not self._receiving:
            time.sleep(timeout)  # nothing inbound: nothing can come
            raise TransportTimeout(f"rank {self.rank}: nothing arrived for {timeout:.0f} s")
        deadline = time.monotonic() + timeout
        while (msg := self.try_recv()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportTimeout(f"rank {self.rank}: nothing arrived for {timeout:.0f} s")
            select.select([r.wait_fd for r in self._receiving], [], [], left)
        return msg

    def flush(self, timeout: float) -> None:  # a sent message is in the ring already
        pass

    @property
    def queued(self) -> int:
        """Messages sent and not yet taken (as far as this end has heard), plus those ready here."""
        return sum(self.capacity - r.available for r in self._sending.values()) + sum(
            r.available for r in self._receiving
        )

    def close(self) -> None:
        for ring in [*self._receiving, *self._sending.values()]:
            for fd in (ring.signal_fd, ring.wait_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
            for path in ring.paths:  # a sender that never attached left them
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        self._receiving, self._sending = [], {}
        with contextlib.suppress(OSError):
            self.directory.rmdir()

    # The base class's transport threads are not used here: the stage's thread does it all.
    def _send_one(self, stream: Stream, msg: Message) -> None:
        raise AssertionError("SharedMemoryTransport has no send threads")

    def _receive_one(self, stream: Stream) -> Message:
        raise AssertionError("SharedMemoryTransport has no receive threads")

    # ------------------------------------------------------------ helpers
    def _take(self, ring: _Ring) -> Message:
        """The message in the ring's next slot, copied out; the slot goes back to the sender."""
        slot, layout = ring.slots[ring.next_slot], ring.layout
        code, step = ring.headers[ring.next_slot]
        if code not in CODE_KINDS:
            name = ring.stream.name
            raise WireViolation(f"stream {name}: step {step}: header kind code {code} is not a message kind")
        payload = layout.payload(slot).to(self.compute_device, copy=True)
        labels = layout.labels(slot).to(self.compute_device, copy=True) if ring.stream.up else None
        os.write(ring.signal_fd, b"\x01")  # after the copy: the sender may write the slot again
        ring.next_slot = (ring.next_slot + 1) % self.capacity
        ring.available -= 1
        msg = Message(CODE_KINDS[code], step, ring.stream.src, ring.stream.dst, payload, labels)
        self._admit(ring.stream, msg)
        self.stats.add(False, message_bytes(msg))
        return msg

    def _await(self, ring: _Ring, timeout: float, what: str) -> None:
        """Wait for a free slot (sender) for up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not _drain(ring):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportTimeout(f"rank {self.rank}: {what} for {timeout:.0f} s")
            select.select([ring.wait_fd], [], [], left)


def room_problem(streams: list[Stream], capacity: int, where: Path | None = None) -> str | None:
    """Why this machine cannot hold the rings of ``streams`` in ``where`` (by default where
    rings go), in one line; None if it can: POSIX FIFOs, and free space for the rings."""
    if not hasattr(os, "mkfifo"):
        return "transport=shm needs POSIX FIFOs (Linux, macOS); use transport=gloo here"
    where = where or _base_directory()
    free, need = _free_bytes(where), ring_bytes(streams, capacity)
    if need > free:
        return (
            f"transport=shm needs {need / 2**20:.1f} MiB in {where}, which has {free / 2**20:.1f} MiB free; "
            "give it more (docker run --shm-size) or use transport=gloo"
        )
    return None


def shm_room(streams: list[Stream], capacity: int) -> bool:
    """Can this machine hold every ring of a run? (Run where the stages are: the Ray engine
    asks on their node.)"""
    return room_problem(streams, capacity) is None


def ring_bytes(streams: list[Stream], capacity: int) -> int:
    """The bytes of the rings of ``streams``, ``capacity`` slots each."""
    return sum(_slot_bytes(Layout.of(s)) * capacity for s in streams)


def _reserve(path: Path, size: int, rank: int) -> None:
    """Create the ring file with its pages allocated where the system can (Linux): the
    free-space check alone races with whatever else fills /dev/shm later (Ray's object store
    lives there too), and a page that cannot be had when first written is a SIGBUS."""
    with open(path, "wb") as f:
        f.truncate(size)
        if not hasattr(os, "posix_fallocate"):  # macOS: a sparse file, checked above only
            return
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it
                return
            path.unlink()  # what it did allocate goes back to a /dev/shm that is short already
            raise TransportError(
                f"rank {rank}: transport=shm could not reserve {size / 2**20:.1f} MiB in {path.parent} "
                f"({exc.strerror}); give it more (docker run --shm-size) or use transport=gloo"
            ) from None


def _free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _drain(ring: _Ring) -> int:
    """Count the bytes waiting on the ring's wait FIFO (non-blocking) into ``available``."""
    try:
        got = len(os.read(ring.wait_fd, 4096))
    except BlockingIOError:
        return 0
    ring.available += got
    return got


def _slot_bytes(layout: Layout) -> int:
    return -(-layout.nbytes // SLOT_ALIGN) * SLOT_ALIGN
