"""Soak: 10,000 steps with one stage about 10x slower, with random jitter."""

from __future__ import annotations

import pytest
import ray
from conftest import config
from helpers import start_local_ray

from dni_dist.builder import load_data
from dni_dist.engines.ray_engine import RayRun

STEPS = 10_000


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    start_local_ray()
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ten_thousand_steps_with_a_slow_jittery_stage_lose_nothing_and_stay_flat() -> None:
    cfg = config(
        "runtime=ray",
        "transport=gloo",
        "dist.cpus_per_stage=0.5",
        "method=sg",
        "segments=3",
        "model.width=64",
        "data.name=artificial",
        "data.dim=20",
        "data.samples=25000",
        "data.batch_size=8",
        # The middle stage computes about 1 ms per step here; it sleeps 7-11 ms more (random,
        # 9 ms on average), so it is about 10x slower than the stages around it.
        "dist.slow_stage=1",
        "dist.slow_seconds=0.007",
        "dist.slow_jitter=0.004",
    )
    data = load_data(cfg)
    per_epoch = len(data.x_train) // cfg.data.batch_size
    epochs = -(-STEPS // per_epoch)
    run = RayRun(cfg, data)
    try:
        for epoch in range(epochs):
            run.train_epoch(epoch)  # a deadlock would end in a TransportTimeout, not a hang
        summaries = run.stage_summaries()
    finally:
        run.close()
    steps = epochs * per_epoch
    assert steps >= STEPS
    for stage, s in enumerate(summaries):
        # every step id reached every stage once, in order (the loop checks the order)
        assert s["steps"] == steps, stage
        assert s["dropped_targets"] == 0 and s["evicted_steps"] == 0, stage
        rss = [epoch[stage]["rss_bytes"] for epoch in run.epoch_reports]
        assert rss[-1] - rss[1] < 32 * 2**20, (stage, rss)  # flat after the first epoch
    for s in summaries[:-1]:
        assert s["sg_updates"] == steps  # one target per step, none lost, none twice
    # the fast stages were held back by the bounded queues, not buffered without limit
    first = [epoch[0] for epoch in run.epoch_reports]
    assert max(r["max_pending"] for r in first) <= summaries[0]["in_flight_limit"]
    assert max(r["max_queued"] for r in first) <= 2 * cfg.dist.capacity + 1
