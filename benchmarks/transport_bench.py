"""Transport throughput: gRPC vs gloo, one process sending to another on loopback.

    python benchmarks/transport_bench.py [--out DIR]

Measures our transports end to end (queues, sender/receiver threads, framing, chunking,
acknowledgements), not the bare wire: the receiving process times from the first message
(left out as warm-up) to the last. Writes DIR/transport.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

import torch

SIZES = {"4 KiB": 4 << 10, "1 MiB": 1 << 20, "16 MiB": 16 << 20}
COUNTS = {"4 KiB": 3000, "1 MiB": 300, "16 MiB": 30}


def _transport(kind: str, rank: int, stream, port: int, addresses):
    inbound, outbound = ([stream], []) if rank == 1 else ([], [stream])
    if kind == "gloo":
        from dni_dist.transports.torch_dist import TorchDistTransport, init_links

        groups = init_links("gloo", "127.0.0.1", port, rank, 2, 120, torch.device("cpu"), [stream])
        return TorchDistTransport(rank, inbound, outbound, groups, torch.device("cpu"), torch.device("cpu"))
    from dni_dist.transports.grpc_transport import GrpcTransport

    transport = GrpcTransport(rank, inbound, outbound, "bench")
    addresses.put((rank, transport.address))
    return transport


def _worker(kind: str, rank: int, size: int, count: int, port: int, addresses, results) -> None:
    from dni_dist.core.messages import Kind, Message
    from dni_dist.transports.base import Stream

    torch.set_num_threads(1)
    stream = Stream(0, 1, False, (size // 4,))
    transport = _transport(kind, rank, stream, port, addresses)
    if kind == "grpc" and rank == 0:
        peers = {}
        while 1 not in peers:
            r, address = addresses.get(timeout=60)
            peers[r] = address
        transport.connect(peers)
    transport.start()
    if rank == 0:
        payload = torch.randn(size // 4)
        for step in range(count):
            transport.send(Message(Kind.GRAD, step, 0, 1, payload))
        transport.flush(120)
        results.put(None)
    else:
        transport.expect(0, count)
        transport.recv(timeout=120)
        started = time.perf_counter()
        for _ in range(count - 1):
            transport.recv(timeout=120)
        seconds = time.perf_counter() - started
        results.put({"seconds": seconds, "messages": count - 1})
    time.sleep(0.5)  # let the peer finish its last exchange before tearing down
    transport.close()
    if kind == "gloo":
        torch.distributed.destroy_process_group()


def measure(kind: str, label: str) -> dict:
    from dni_dist.transports.torch_dist import free_port

    ctx = mp.get_context("spawn")
    addresses, results = ctx.Queue(), ctx.Queue()
    port = free_port()
    size, count = SIZES[label], COUNTS[label]
    procs = [ctx.Process(target=_worker, args=(kind, r, size, count, port, addresses, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    timing = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    t = next(x for x in timing if x)
    return {
        "transport": kind,
        "size": label,
        "bytes_per_second": t["messages"] * size / t["seconds"],
        "messages_per_second": t["messages"] / t["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-transport")
    args = parser.parse_args()
    rows = [measure(kind, label) for label in SIZES for kind in ("gloo", "grpc")]
    print("| size | transport | MB/s | messages/s | grpc / gloo |")
    print("|---|---|---|---|---|")
    for i, r in enumerate(rows):
        ratio = f"{r['bytes_per_second'] / rows[i - 1]['bytes_per_second']:.2f}" if r["transport"] == "grpc" else ""
        mb, msgs = r["bytes_per_second"] / 1e6, r["messages_per_second"]
        print(f"| {r['size']} | {r['transport']} | {mb:.1f} | {msgs:.0f} | {ratio} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transport.json").write_text(json.dumps({"results": rows}, indent=2))


if __name__ == "__main__":
    main()
