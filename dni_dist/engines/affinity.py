"""Pinning each stage actor to CPU cores of its own (``dist.pin_cpus``).

Ray reserves CPUs as numbers, not as cores: every worker may run on any core of its node,
and the kernel moves a stage's threads (its compute thread, its link threads, gloo's) from
core to core, each move leaving the stage's caches behind. On the 2-core machine the same
``Stage`` calls took 15-55% more CPU in an unpinned Ray stage than in one process, and as
much as in one process once pinned (benchmarks/RESULTS.md, "Issue 14, third round").

Which cores: the stages on one node take slots in stage order, ``ceil(cpus_per_stage)``
cores each, from the cores the actor may use (``os.sched_getaffinity``: a container's
cpuset, say). A stage claims its cores with an exclusive ``flock`` on one file per core
(``CLAIMS_DIR``, or ``dist.core_claims_dir``), held for the actor's life and dropped by the
kernel when the process ends, however it ends (unless it forked a child that still holds
the file open), so two runs on one machine never pin to the same core: a core another run
holds is passed over for the next free one. Runs that do not see the same directory (two
containers, each with its own /tmp) do not see each other's claims. Pinning is all or
nothing: when some stage finds too few free cores, ``auto`` pins none (and says so in one
line), ``on`` stops with one line. A restarted stage waits a few seconds for the cores of
the stage it replaces, whose process may not have ended yet.

``auto`` pins only on a Ray this process started (the CLI's embedded Ray, a benchmark's):
on a shared cluster, processes that are not ours float over every core, our pinned stage
among them, and it could no longer move away from a busy one.

GPU locality: a stage on a GPU tries the cores near that GPU first, those of the GPU's
NUMA node as the kernel lists them for its PCI device (``local_cpulist`` in sysfs), so its
host-side work (launching kernels, staging copies for gloo, the links' threads) runs on the
socket the GPU hangs off; on a two-socket 8-GPU server the other socket's cores are a hop
further from the GPU and from the pinned memory its copies use. When the kernel does not
say (no sysfs, an older torch without PCI ids, a CPU stage), every allowed core is as near.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import tempfile
import threading
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import torch

from dni_dist.errors import ConfigError

CLAIMS_DIR = Path(tempfile.gettempdir()) / "dni-dist-cores"
PCI_DEVICES = Path("/sys/bus/pci/devices")


def should_pin(mode: str, own_ray: bool) -> bool:
    """``on``: always; ``auto``: only on a Ray this process started (the machine is ours);
    ``off``: never."""
    return mode == "on" or (mode == "auto" and own_ray)


def cpu_slots(stage_nodes: Sequence[str]) -> list[int]:
    """Each stage's slot on its node: how many stages before it (in stage order) share its node."""
    seen: dict[str, int] = {}
    slots = []
    for node in stage_nodes:
        slots.append(seen.get(node, 0))
        seen[node] = slots[-1] + 1
    return slots


def slot_width(cpus_per_stage: float) -> int:
    """Whole cores per slot: a stage with 1.5 CPUs gets 2 cores, one with 0.5 gets 1."""
    return max(1, math.ceil(cpus_per_stage - 1e-9))


def candidate_cores(allowed: Sequence[int], slot: int, width: int, near: Collection[int] = ()) -> list[int]:
    """``allowed`` in the order a stage tries them: from its slot's first core on, round the
    end; a run alone on its machine gets slot i's cores, later runs the next free ones.
    Cores in ``near`` (its GPU's NUMA node) come first, each group in that order."""
    cores = sorted(allowed)
    if not cores:
        return []
    first = (slot * width) % len(cores)
    order = cores[first:] + cores[:first]
    return [c for c in order if c in near] + [c for c in order if c not in near]


def parse_cpulist(text: str) -> set[int]:
    """The cores of a kernel CPU list such as ``0-15,32-47`` (sysfs ``local_cpulist``)."""
    cores: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        cores.update(range(int(low), int(high or low) + 1))
    return cores


def pci_local_cores(domain: int, bus: int, device: int, root: Path = PCI_DEVICES) -> set[int]:
    """The cores of the NUMA node of PCI device ``domain:bus:device.0``; empty when the
    kernel does not say (no sysfs in the container, no such device, an unreadable list)."""
    path = root / f"{domain:04x}:{bus:02x}:{device:02x}.0" / "local_cpulist"
    try:
        return parse_cpulist(path.read_text())
    except (OSError, ValueError):
        return set()


def gpu_local_cores(index: int, root: Path = PCI_DEVICES) -> set[int]:
    """The cores near CUDA device ``index`` (its PCI ids from torch, its NUMA node's cores
    from sysfs); empty when either is unknown (torch builds without the PCI ids)."""
    props = torch.cuda.get_device_properties(index)
    ids = [getattr(props, f"pci_{name}_id", None) for name in ("domain", "bus", "device")]
    if any(not isinstance(i, int) for i in ids):
        return set()
    return pci_local_cores(*ids, root=root)


class CoreClaim:
    """The cores one stage holds: an exclusive flock on ``DIR/core-N`` per core."""

    def __init__(self, directory: Path = CLAIMS_DIR) -> None:
        self.directory = directory
        self.cores: list[int] = []
        self._fds: list[int] = []

    def claim(
        self, allowed: Sequence[int], slot: int, width: int, patience: float = 0.0, near: Collection[int] = ()
    ) -> list[int] | None:
        """``width`` free cores of ``allowed`` (those ``near`` first), held from now on; None
        (holding none) if fewer are free, after trying again for up to ``patience`` seconds."""
        deadline = time.monotonic() + patience
        while True:
            cores = self._claim_once(allowed, slot, width, near)
            if cores is not None or time.monotonic() >= deadline:
                return cores
            time.sleep(0.1)

    def _claim_once(self, allowed: Sequence[int], slot: int, width: int, near: Collection[int]) -> list[int] | None:
        self.release()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError:  # an unwritable temp directory: no claims, so no pinning
            return None
        with contextlib.suppress(OSError):  # another user's directory: theirs to open up
            os.chmod(self.directory, 0o1777)  # like /tmp: every user's runs share the claims
        for core in candidate_cores(allowed, slot, width, near):
            if len(self.cores) == width:
                break
            fd = self._lock(core)
            if fd is not None:
                self._fds.append(fd)
                self.cores.append(core)
        if len(self.cores) < width:
            self.release()
            return None
        return sorted(self.cores)

    def free(self, allowed: Sequence[int]) -> int:
        """How many of ``allowed`` no stage holds now (for the error line)."""
        count = 0
        for core in allowed:
            if core in self.cores:
                continue
            fd = self._lock(core)
            if fd is not None:
                os.close(fd)  # closing drops the lock again
                count += 1
        return count

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds, self.cores = [], []

    def _lock(self, core: int) -> int | None:
        """An fd holding ``core``'s lock, or None if another holds it, or its file cannot be
        opened or locked (another user's, a read-only or lock-less file system)."""
        try:
            fd = os.open(self.directory / f"core-{core}", os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError:
            return None
        with contextlib.suppress(OSError):  # ours: readable by every user's runs whatever the umask
            os.fchmod(fd, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by another (BlockingIOError), or no locks here
            os.close(fd)
            return None
        return fd


def too_few_cores(stage: int, node: str, width: int, allowed: int, free: int) -> ConfigError:
    """The one line when ``dist.pin_cpus=on`` cannot give a stage cores of its own."""
    return ConfigError(
        f"dist.pin_cpus=on: stage {stage} needs {width} core(s) of its own on node {node or 'local'}, which lets "
        f"this run use {allowed} core(s), {free} of them free to claim (other stages or runs hold the rest, "
        "or their lock files cannot be opened); "
        "lower dist.cpus_per_stage or segments, or set dist.pin_cpus=auto"
    )


def compute_niceness(offset: int) -> int:
    """The niceness for a pinned stage's compute thread (``dist.compute_nice_offset``): this
    thread's plus ``offset``.

    The stage's link threads share its cores, so a link thread woken by a message would
    otherwise wait for the compute thread's time slice before it passes the message on; the
    pipeline's round trip grows by that, and stage 0 idles at its in-flight limit. A nicer
    compute thread lets the kernel run a woken link thread at once; only the stage's own
    threads run on its cores, so the compute thread gives way to nothing else. (Making the
    link threads less nice instead needs CAP_SYS_NICE, which containers rarely have.) On
    the CPU a stage with one inbound stream has no link threads of ours any more (its own
    thread posts its sends and receives), so the default offset is 0 (RESULTS.md)."""
    return min(19, os.getpriority(os.PRIO_PROCESS, 0) + offset)


def set_thread_niceness(niceness: int) -> None:
    """Set the calling thread's niceness (Linux keeps one per thread)."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)


def pin_process(cores: Sequence[int]) -> list[int]:
    """Pin every thread of this process to ``cores`` (threads started later inherit it from
    the thread that starts them); returns the cores now in effect. Until no new thread
    shows up: one started meanwhile by a thread not yet pinned would keep every core."""
    wanted = set(cores)
    done: set[str] = set()
    while tids := set(os.listdir("/proc/self/task")) - done:
        for tid in tids:
            with contextlib.suppress(ProcessLookupError):  # the thread ended in between
                os.sched_setaffinity(int(tid), wanted)
        done |= tids
    return sorted(os.sched_getaffinity(0))
