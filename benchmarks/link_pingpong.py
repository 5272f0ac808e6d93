"""Link round trip of the torch.distributed transport (gloo) between two processes.

    python benchmarks/link_pingpong.py TREE [ROUNDS] [FLOATS]

TREE is a checkout of this project (its ``dni_dist`` is imported): run it on two checkouts
back to back to compare them. Rank 0 sends an activation (FLOATS float32 values and one
label) and waits for a gradient of the same size back, ROUNDS times (default 1000, 1024:
4 KiB). Prints the median round trip (the first 20 left out) and each rank's CPU time per
round trip (every thread of the process). Works with the per-link groups (``init_links``)
and with the older up/down groups (``init_groups``) of main before issue 14.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import sys
import time
from typing import Any

WARMUP = 20


def _transport(td: Any, rank: int, port: int, there: Any, back: Any) -> Any:
    import torch

    cpu = torch.device("cpu")
    inbound, outbound = ([back], [there]) if rank == 0 else ([there], [back])
    if hasattr(td, "init_links"):  # one group per link (issue 14)
        groups = td.init_links("gloo", "127.0.0.1", port, rank, 2, 60, cpu, [there, back])
        return td.TorchDistTransport(rank, inbound, outbound, groups, cpu, cpu)
    up, down = td.init_groups("gloo", "127.0.0.1", port, rank, 2, 60, cpu)  # main before issue 14
    return td.TorchDistTransport(rank, inbound, outbound, up, down, cpu, cpu)


def _worker(tree: str, rank: int, port: int, results: Any, rounds: int, size: int) -> None:
    sys.path.insert(0, tree)
    import torch

    import dni_dist.transports.torch_dist as td
    from dni_dist.core.messages import Kind, Message, Stream

    torch.set_num_threads(1)
    there, back = Stream(0, 1, True, (size,), (1,)), Stream(1, 0, False, (size,))
    transport = _transport(td, rank, port, there, back)
    transport.start()
    transport.expect(1 - rank, rounds)
    payload, label = torch.zeros(size), torch.zeros(1, dtype=torch.long)
    seconds = []
    cpu_started = time.process_time()
    for n in range(rounds):
        started = time.perf_counter()
        if rank == 0:
            transport.send(Message(Kind.ACTIVATION, n, 0, 1, payload, label))
            transport.recv(60)
        else:
            transport.recv(60)
            transport.send(Message(Kind.GRAD, n, 1, 0, payload))
        seconds.append(time.perf_counter() - started)
    cpu = (time.process_time() - cpu_started) / rounds
    transport.flush(60)
    time.sleep(0.3)  # let the peer take its last message before the groups go
    transport.close()
    td.shutdown_groups()
    results.put((rank, statistics.median(seconds[WARMUP:]), cpu))


def main() -> None:
    tree = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
    sys.path.insert(0, tree)
    from dni_dist.transports.torch_dist import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(tree, r, port, results, rounds, size)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    print(
        f"{tree}: round trip {1e3 * got[0][1]:.3f} ms; CPU per round trip "
        f"rank0 {1e3 * got[0][2]:.3f} ms rank1 {1e3 * got[1][2]:.3f} ms"
    )


if __name__ == "__main__":
    main()
