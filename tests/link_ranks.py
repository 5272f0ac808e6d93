"""Run K stages as K processes over the per-link torch.distributed transport (gloo), every
method in turn, the async schedule (traffic up and down while the stages compute).

``python tests/link_ranks.py OUT.json [METHOD ...]`` (or ``--echo``: two ranks, one
message each way, contents checked): writes each stage's step and update
counts per method, exits 0 when every rank finished, 1 otherwise. A rank that does not
finish within the deadline is killed and the run fails: a hang fails, it never blocks.
The test (test_link_groups.py) runs this in its own session under a hard timeout too.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

STAGES = 4
STEPS = 12
BATCH = 32
DEADLINE_S = 150.0
METHOD_OVERRIDES: dict[str, tuple[str, ...]] = {
    "backprop": ("method=backprop",),
    "sg": ("method=sg",),
    "sg-prop": ("method=sg-prop",),
    "fa": ("method=fa",),
    "dfa": ("method=dfa",),
    "kickback": ("method=kickback",),
    "ddg": ("method=ddg",),
}


def _rank(rank: int, port: int, methods: list[str], results) -> None:
    import torch

    from dni_dist.builder import build_stages, load_data, plan_model
    from dni_dist.config import load_config
    from dni_dist.data import batches
    from dni_dist.engines.stage_loop import StageLoop
    from dni_dist.engines.wiring import all_streams, streams_of
    from dni_dist.transports.torch_dist import TorchDistTransport, init_links, shutdown_groups

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    configs = {
        m: load_config(overrides=[*METHOD_OVERRIDES[m], f"segments={STAGES}", f"data.batch_size={BATCH}"])
        for m in methods
    }
    data = load_data(configs[methods[0]])
    streams = {}
    for m, cfg in configs.items():
        plan = plan_model(cfg, data.input_shape, data.task)
        streams[m] = all_streams(STAGES, plan.cut_shapes, BATCH, data.task, m in ("dfa", "kickback"))
    # Every method's links at once: the groups are made once, in one order, on every rank.
    union = [s for m in methods for s in streams[m]]
    groups = init_links("gloo", "127.0.0.1", port, rank, STAGES, 60, cpu, union)
    out = {}
    for m in methods:
        cfg = configs[m]
        stage = build_stages(cfg, data.input_shape, data.task, only=rank)[0]
        inbound, outbound = streams_of(rank, streams[m])
        transport = TorchDistTransport(rank, inbound, outbound, groups, cpu, cpu)
        transport.start()
        loop = StageLoop(stage, transport, "async", timeout=60)
        inputs = batches(data.x_train, data.y_train, BATCH, 0, 0) if rank == 0 else None
        report = loop.run_epoch(0, STEPS, inputs)
        transport.close()
        out[m] = {
            "steps": stage.stats.steps,
            "updates": stage.stats.updates,
            "messages": report.messages,
            "sent": transport.stats.messages_sent,
            "received": transport.stats.messages_received,
        }
    shutdown_groups()
    results.put((rank, out))


def _echo(rank: int, port: int, _methods: list[str], results) -> None:
    """Two ranks: an activation (payload and labels) up, a gradient back; both checked."""
    import torch

    from dni_dist.core.messages import Kind, Message, Stream
    from dni_dist.transports.torch_dist import TorchDistTransport, init_links, shutdown_groups

    cpu = torch.device("cpu")
    up, down = Stream(0, 1, True, (3, 2), (3,)), Stream(1, 0, False, (3, 2))
    groups = init_links("gloo", "127.0.0.1", port, rank, 2, 60, cpu, [up, down])
    inbound, outbound = ([down], [up]) if rank == 0 else ([up], [down])
    transport = TorchDistTransport(rank, inbound, outbound, groups, cpu, cpu)
    transport.start()
    transport.expect(1 - rank, 1)
    x, labels = torch.arange(6.0).reshape(3, 2), torch.tensor([7, 8, 9])
    if rank == 0:
        transport.send(Message(Kind.ACTIVATION, 41, 0, 1, x, labels))
        got = transport.recv(30)
        ok = got.kind is Kind.BOOTSTRAP and got.step == 41 and torch.equal(got.tensor, -x) and got.labels is None
    else:
        got = transport.recv(30)
        ok = got.kind is Kind.ACTIVATION and got.step == 41 and torch.equal(got.tensor, x)
        ok = ok and got.labels is not None and torch.equal(got.labels, labels)
        transport.send(Message(Kind.BOOTSTRAP, 41, 1, 0, -got.tensor))
    transport.flush(30)
    transport.close()
    shutdown_groups()
    results.put((rank, {"echo": ok}))


def main(path: str, methods: list[str]) -> int:
    from dni_dist.transports.torch_dist import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    echo = methods == ["--echo"]
    ranks = 2 if echo else STAGES
    target = _echo if echo else _rank
    procs = [ctx.Process(target=target, args=(r, port, methods, results), daemon=True) for r in range(ranks)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    collected = {}
    while len(collected) < ranks and time.monotonic() < deadline:
        try:
            rank, out = results.get(timeout=1.0)
            collected[rank] = out
        except Exception:  # queue.Empty: look for a dead rank
            if any(p.exitcode not in (None, 0) for p in procs):
                break
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
    Path(path).write_text(json.dumps({str(r): collected[r] for r in sorted(collected)}))
    ok = len(collected) == ranks and all(p.exitcode == 0 for p in procs)
    ok = ok and all(out.get("echo", True) for out in collected.values())
    print(
        "link ranks:",
        "ok" if ok else f"failed (finished ranks {sorted(collected)}, exit codes {[p.exitcode for p in procs]})",
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:] or list(METHOD_OVERRIDES)))
