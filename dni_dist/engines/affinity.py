"""Pinning each stage actor to its own CPU cores (``dist.pin_cpus``).

Ray reserves CPUs as numbers, not as cores: every worker may run on any core of its node.
With the stages of one pipeline on one node, the kernel then moves a stage's threads from
core to core (its compute thread, its link threads and gloo's), and each move leaves the
stage's caches behind. Pinned, each stage keeps its threads on its own cores. Measured on
the 2-core machine (benchmarks/RESULTS.md, "Pinned stages"): digits K=2 on Ray, 15.6k
samples/s unpinned against 18.6k pinned, mean of four alternating pairs.

Which cores: the stages placed on one node take consecutive slots, in stage order, of
``ceil(cpus_per_stage)`` cores each, from the cores the actor may use
(``os.sched_getaffinity``: a container's cpuset, say). Two jobs on one node know nothing of
each other's slots, so both would pin their stage 0 to the same cores; hence ``auto`` pins
only on a Ray this process started (the CLI's embedded Ray, a benchmark's: no other job can
reach it), and ``on`` is for nodes the user knows this run has to itself. NUMA and GPU locality are not considered.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence

from dni_dist.errors import ConfigError

PIN_MODES = ("auto", "on", "off")


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


def slot_cores(allowed: Sequence[int], slot: int, width: int) -> list[int] | None:
    """The cores of ``slot`` among ``allowed`` (sorted), or None when the node has too few."""
    cores = sorted(allowed)
    first = slot * width
    if first + width > len(cores):
        return None
    return cores[first : first + width]


def plan_pins(
    stage_nodes: Sequence[str], allowed: Sequence[Sequence[int]], cpus_per_stage: float
) -> list[list[int]] | None:
    """Every stage's cores (``allowed``: the cores each actor may use), or None when some
    node has fewer cores than its stages' slots: then no stage is pinned."""
    width = slot_width(cpus_per_stage)
    pins = [slot_cores(cores, slot, width) for cores, slot in zip(allowed, cpu_slots(stage_nodes), strict=True)]
    return None if any(p is None for p in pins) else pins  # type: ignore[return-value]


def too_few_cores(stage_nodes: Sequence[str], allowed: Sequence[Sequence[int]], cpus_per_stage: float) -> ConfigError:
    """The one line when ``dist.pin_cpus=on`` cannot give every stage cores of its own."""
    width = slot_width(cpus_per_stage)
    for node, cores in zip(stage_nodes, allowed, strict=True):
        stages = sum(1 for n in stage_nodes if n == node)
        if stages * width > len(cores):
            break
    return ConfigError(
        f"dist.pin_cpus=on: {stages} stages of {width} core(s) each are placed on node {node or 'local'}, "
        f"where this run may use {len(cores)} core(s); lower dist.cpus_per_stage or segments, or set dist.pin_cpus=auto"
    )


def compute_niceness(offset: int) -> int:
    """The niceness for a pinned stage's compute thread (``dist.compute_nice_offset``): this
    thread's plus ``offset``.

    The stage's link threads share its cores, so a link thread woken by a message would
    otherwise wait for the compute thread's time slice before it passes the message on; the
    pipeline's round trip grows by that, and stage 0 idles at its in-flight limit. A nicer
    compute thread lets the kernel run a woken link thread at once; only the stage's own
    threads run on its cores, so the compute thread gives way to nothing else. (Making the
    link threads less nice instead needs CAP_SYS_NICE, which containers rarely have.)"""
    return min(19, os.getpriority(os.PRIO_PROCESS, 0) + offset)


def set_thread_niceness(niceness: int) -> None:
    """Set the calling thread's niceness (Linux keeps one per thread)."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)


def pin_process(cores: Sequence[int]) -> list[int]:
    """Pin every thread of this process to ``cores`` (threads started later inherit it from
    the thread that starts them); returns the cores now in effect."""
    wanted = set(cores)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), wanted)
        except ProcessLookupError:  # the thread ended in between
            continue
    return sorted(os.sched_getaffinity(0))
