"""Run stage loops in threads over the in-process transport (no Ray, no sockets)."""

from __future__ import annotations

import threading

from dni_dist.builder import build_stages, load_data, plan_model
from dni_dist.config import TrainConfig
from dni_dist.core.stage import Stage
from dni_dist.data import Dataset, batches
from dni_dist.engines.stage_loop import EpochReport, StageLoop
from dni_dist.engines.wiring import all_streams, streams_of
from dni_dist.transports.inproc import InProcessHub, InProcessTransport


def run_threaded(
    cfg: TrainConfig,
    schedule: str,
    epochs: int = 1,
    slow: dict[int, float] | None = None,
    steps: int | None = None,
) -> tuple[list[Stage], list[list[EpochReport]], Dataset]:
    data = load_data(cfg)
    stages = build_stages(cfg, data.input_shape, data.task)
    plan = plan_model(cfg, data.input_shape, data.task)
    streams = all_streams(
        cfg.segments, plan.cut_shapes, cfg.data.batch_size, data.task, stages[-1].direct_error, stages[0].wire_dtype
    )
    hub = InProcessHub(capacity=4)
    transports = []
    for stage in stages:
        inbound, outbound = streams_of(stage.index, streams)
        transports.append(InProcessTransport(hub, stage.index, inbound, outbound))
    loops = [
        StageLoop(
            s, t, schedule, 60, (slow or {}).get(s.index, 0.0), cfg.dist.max_in_flight, 0.0, cfg.dist.pending_memory
        )
        for s, t in zip(stages, transports, strict=True)
    ]
    reports: list[list[EpochReport]] = [[] for _ in stages]
    per_epoch = len(data.x_train) // cfg.data.batch_size if steps is None else steps
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for epoch in range(epochs):
                inputs = batches(data.x_train, data.y_train, cfg.data.batch_size, cfg.seed, epoch) if k == 0 else None
                reports[k].append(loops[k].run_epoch(epoch * per_epoch, per_epoch, inputs))
        except BaseException as exc:  # re-raised in the test thread
            errors.append(exc)

    for t in transports:
        t.start()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(stages))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for t in transports:
        t.close()
    if errors:
        raise errors[0]
    return stages, reports, data
