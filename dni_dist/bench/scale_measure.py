"""Measure the scale model's inputs on this machine: per-stage costs and the link.

Costs are timed by calling the project's own ``Stage`` methods (what every engine runs),
in this process, with ``torch`` limited to ``threads`` threads (1 mimics a Ray actor with
one CPU), median of ``repeats`` after a warm-up. The link is timed with the engine's own
``TorchDistTransport`` (gloo) between two processes: half a ping-pong round trip, so the
latency includes the transport's queues, threads and framing, not just the wire.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from dni_dist.bench.scale_sim import Link, StageCosts
from dni_dist.builder import build_stages, load_data
from dni_dist.config import load_config
from dni_dist.core.messages import Kind, Message
from dni_dist.core.stage import Stage
from dni_dist.data import batches

WARMUP = 3


def _median(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for i in range(WARMUP + repeats):
        started = time.perf_counter()
        fn()
        if i >= WARMUP:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure_costs(overrides: list[str], repeats: int = 10, threads: int = 1) -> list[StageCosts]:
    """Per-stage costs of the model ``overrides`` describe (``segments`` = K stages).

    backprop's forward/backward come from a ``method=backprop`` build, the DNI update and
    SG training (true targets) from a ``method=sg`` build of the same cut model.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _measure(overrides, repeats)
    finally:
        torch.set_num_threads(previous)


def _measure(overrides: list[str], repeats: int) -> list[StageCosts]:
    bp_cfg = load_config(overrides=[*overrides, "method=backprop"])
    sg_cfg = load_config(overrides=[*overrides, "method=sg", "sg.target=true"])
    data = load_data(bp_cfg)
    x, y = next(batches(data.x_train, data.y_train, bp_cfg.data.batch_size, 0, 0))
    bp = build_stages(bp_cfg, data.input_shape, data.task)
    sg = build_stages(sg_cfg, data.input_shape, data.task)
    inputs = [x]
    with torch.no_grad():
        for stage in bp[:-1]:
            inputs.append(stage.module(inputs[-1]))
    steps = iter(range(1 << 30))  # a fresh step id per call: stages key pending steps by it
    return [_stage_costs(b, s, inputs, y, steps, repeats) for b, s in zip(bp, sg, strict=True)]


def _stage_costs(
    bp: Stage, sg: Stage, inputs: list[torch.Tensor], y: torch.Tensor, steps: Iterator[int], repeats: int
) -> StageCosts:
    """One stage: ``bp`` and ``sg`` are its backprop and DNI builds, ``inputs[k]`` its input."""
    k = bp.index
    xk = inputs[k]
    param_bytes = sum(_nbytes(p) for p in bp.module.parameters())
    if bp.is_top:  # forward, loss, backward and update are one call; time the forward alone too
        whole = _median(lambda: bp.forward(next(steps), xk, y), repeats)
        forward = _median(lambda: bp.task.loss(bp.module(xk.requires_grad_(k > 0)), y), repeats)
        return StageCosts(forward, max(whole - forward, 0.0), param_bytes=param_bytes)
    h = inputs[k + 1]
    grad = torch.randn_like(h) * 1e-3

    def bp_step() -> tuple[float, float]:
        n = next(steps)
        t0 = time.perf_counter()
        bp.forward(n, xk, y)
        t1 = time.perf_counter()
        bp.on_message(Message(Kind.GRAD, n, k + 1, k, grad))
        return t1 - t0, time.perf_counter() - t1

    def sg_step() -> tuple[float, float, float]:
        n = next(steps)
        t0 = time.perf_counter()
        sg.forward(n, xk, y)
        t1 = time.perf_counter()
        sg.update(n)
        t2 = time.perf_counter()
        sg.on_message(Message(Kind.GRAD, n, k + 1, k, grad))
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    bp_times = [bp_step() for _ in range(WARMUP + repeats)][WARMUP:]
    sg_times = [sg_step() for _ in range(WARMUP + repeats)][WARMUP:]
    forward, backward = (statistics.median(c) for c in zip(*bp_times, strict=True))
    dni_forward, update, train = (statistics.median(c) for c in zip(*sg_times, strict=True))
    return StageCosts(
        forward_s=forward,
        backward_s=backward,
        sg_s=update,
        sg_train_s=train,
        activation_bytes=_nbytes(h) + _nbytes(y) + 16,  # + the (kind, step) header
        grad_bytes=_nbytes(h) + 16,
        param_bytes=param_bytes,
        dni_forward_s=dni_forward,
    )


# ------------------------------------------------------------------------ link
def _pingpong(rank: int, port: int, sizes: list[int], rounds: int, results) -> None:
    from dni_dist.transports.base import Stream
    from dni_dist.transports.torch_dist import TorchDistTransport, init_links, shutdown_groups

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    links = [Stream(0, 1, True, (1,)), Stream(1, 0, False, (1,))]  # one group per direction
    groups = init_links("gloo", "127.0.0.1", port, rank, 2, 120, cpu, links)
    timings = []
    for size in sizes:
        there = Stream(0, 1, True, (size,), (1,))  # like an activation: payload and labels
        back = Stream(1, 0, False, (size,))  # like a gradient
        inbound, outbound = ([back], [there]) if rank == 0 else ([there], [back])
        transport = TorchDistTransport(rank, inbound, outbound, groups, cpu, cpu)
        transport.start()
        transport.expect(1 - rank, rounds)
        payload, label = torch.zeros(size), torch.zeros(1, dtype=torch.long)
        seconds = []
        for n in range(rounds):
            started = time.perf_counter()
            if rank == 0:
                transport.send(Message(Kind.ACTIVATION, n, 0, 1, payload, label))
                transport.recv(60)
            else:
                transport.recv(60)
                transport.send(Message(Kind.GRAD, n, 1, 0, payload))
            seconds.append(time.perf_counter() - started)
        transport.flush(60)
        transport.close()
        timings.append(statistics.median(seconds[WARMUP:]))
    if rank == 0:
        results.put(timings)
    shutdown_groups()


def measure_link(message_bytes: int, rounds: int = 40) -> tuple[Link, dict[str, Any]]:
    """Latency (half the round trip of a tiny message) and bandwidth (from the extra time a
    large message takes: ``message_bytes``, at least 8 MiB so the transfer outweighs the
    noise) of the gloo transport between two processes here."""
    from dni_dist.transports.torch_dist import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    sizes = [1, max(message_bytes, 8 << 20) // 4]
    procs = [ctx.Process(target=_pingpong, args=(r, port, sizes, rounds, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    small, big = results.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    latency = small / 2
    extra = big / 2 - latency
    # A busy machine can make the large message look no slower than the small one; then the
    # bandwidth is not resolved and the link is modelled by its latency alone.
    bandwidth = sizes[1] * 4 / extra if extra > 0 else math.inf
    raw = {"round_trip_small_s": small, "round_trip_big_s": big, "big_bytes": sizes[1] * 4}
    return Link(latency_s=latency, bandwidth_Bps=bandwidth), raw
