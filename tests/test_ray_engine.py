"""The distributed engine on an embedded Ray (2 CPUs), gloo transport.

One Ray session for the whole module (starting Ray costs seconds on 2 cores).
"""

from __future__ import annotations

import json
import os

import pytest
import ray
import torch
from conftest import config
from helpers import stages_for, start_local_ray, wait_for

from dni_dist.data import batches
from dni_dist.engines.local import LocalEngine
from dni_dist.engines.ray_engine import RayRun
from dni_dist.runner import train

RAY = ("runtime=ray", "transport=gloo", "dist.cpus_per_stage=0.5")


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    start_local_ray()
    yield
    ray.shutdown()


def _local_states(overrides: tuple[str, ...], epochs: int) -> list[dict[str, dict[str, torch.Tensor]]]:
    stages, data = stages_for(*overrides)
    engine = LocalEngine(stages)
    for epoch in range(epochs):
        for x, y in batches(data.x_train, data.y_train, 64, 0, epoch):
            engine.train_step(x, y)
    return [
        {"module": s.module.state_dict(), "boundary": {} if s.boundary is None else s.boundary.state_dict()}
        for s in stages
    ]


@pytest.mark.parametrize(
    ("overrides", "transport"),
    [
        (("method=sg", "sg.target=true", "segments=3"), "gloo"),
        (("method=sg", "sg.target=bootstrap", "segments=3"), "gloo"),
        (("method=backprop", "segments=2"), "gloo"),
        (("method=sg", "sg.target=true", "segments=3"), "grpc"),
        (("method=backprop", "segments=2"), "grpc"),
        (("method=ddg", "segments=3"), "gloo"),
        # bf16 on the wire: both transports carry the stream's dtype byte for byte.
        pytest.param(("method=sg", "sg.target=true", "segments=3", "precision=bf16"), "gloo", marks=pytest.mark.slow),
        pytest.param(("method=dfa", "segments=3", "precision=bf16"), "grpc", marks=pytest.mark.slow),
        # shared memory: a middle stage with two inbound rings; direct errors, top to every stage
        (("method=sg", "sg.target=true", "segments=3"), "shm"),
        (("method=dfa", "segments=3", "precision=bf16"), "shm"),
    ],
    ids=[
        "sg-true-gloo",
        "sg-bootstrap-gloo",
        "backprop-gloo",
        "sg-true-grpc",
        "backprop-grpc",
        "ddg-gloo",
        "sg-true-bf16-gloo",
        "dfa-bf16-grpc",
        "sg-true-shm",
        "dfa-bf16-shm",
    ],
)
def test_lockstep_ends_with_the_local_engines_parameters(overrides: tuple[str, ...], transport: str) -> None:
    """The sacred test: same order of events, so the same numbers (net and SG)."""
    from dni_dist.builder import load_data

    cfg = config(*overrides, *RAY, f"transport={transport}", "dist.schedule=lockstep")
    run = RayRun(cfg, load_data(cfg))
    try:
        run.train_epoch(0)
        run.train_epoch(1)
        distributed = run.states()
    finally:
        run.close()
    local = _local_states(overrides, epochs=2)
    assert len(distributed) == len(local)
    for got, want in zip(distributed, local, strict=True):
        for part in ("module", "boundary"):
            assert got[part].keys() == want[part].keys()
            for name in want[part]:
                torch.testing.assert_close(got[part][name], want[part][name], msg=f"{part}.{name}")


# Accuracy is compared once training has settled (20 epochs): at 10, one async run's
# timing-dependent staleness moves the result by about a point, as much as a change of seed.
SETTLED = "epochs=20"


def _settled_accuracy(out, last: int = 3) -> float:
    """Mean test accuracy of a run's last ``last`` epochs (its metrics.jsonl)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accuracies = [r["test_accuracy"] for r in records if r.get("event") == "epoch"]
    return sum(accuracies[-last:]) / last


@pytest.mark.parametrize("transport", ["gloo", "grpc", "shm"])
def test_async_k2_reaches_the_local_accuracy_band(tmp_path, transport: str) -> None:
    local = train(config(SETTLED, f"out={tmp_path / 'local'}"))
    distributed = train(config(*RAY, SETTLED, f"transport={transport}", "segments=2", f"out={tmp_path / 'ray'}"))
    assert distributed["runtime"] == "ray" and distributed["schedule"] == "async"
    assert distributed["test_accuracy"] >= local["test_accuracy"] - 0.02
    for stage in distributed["stages"]:
        assert {"steps", "busy_fraction", "mean_staleness", "dropped_targets", "sg_loss", "sg_cosine"} <= stage.keys()
        assert 0.0 < stage["busy_fraction"] <= 1.0
        assert stage["steps"] == distributed["steps"]
        assert stage["niceness"] == 0  # dist.niceness, not Ray's default of 15 for workers
        assert stage["cpu_affinity"] is None  # dist.pin_cpus=auto: this Ray is the tests', not the run's
        assert stage["compute_niceness"] is None  # unpinned: the compute thread keeps the process's
    assert distributed["stages"][0]["sg_cosine"] > 0.2
    # clean shutdown: every CPU of the session is free again (actors and placement group gone;
    # Ray releases them asynchronously)
    assert wait_for(lambda: ray.available_resources().get("CPU") == 2, seconds=20)


def test_a_slowed_stage_keeps_the_other_flat_and_every_step_runs_once(tmp_path) -> None:
    from dni_dist.builder import load_data

    cfg = config(*RAY, "segments=2", "epochs=6", "dist.slow_stage=1", "dist.slow_seconds=0.01")
    run = RayRun(cfg, load_data(cfg))
    try:
        for epoch in range(cfg.epochs):
            run.train_epoch(epoch)
        summaries = run.stage_summaries()
    finally:
        run.close()
    steps = cfg.epochs * (1347 // 64)
    fast = [epoch[0] for epoch in run.epoch_reports]
    assert max(r["max_pending"] for r in fast) <= summaries[0]["in_flight_limit"] == 2  # auto at K=2: K
    assert max(r["max_queued"] for r in fast) <= 2 * cfg.dist.capacity + 1
    # memory of the fast stage stays flat while it waits on the slow one (after warm-up)
    assert fast[-1]["rss_bytes"] - fast[1]["rss_bytes"] < 16 * 2**20
    for s in summaries:
        assert s["steps"] == steps and s["dropped_targets"] == 0 and s["evicted_steps"] == 0
    assert summaries[0]["sg_updates"] == steps
    assert summaries[1]["busy_fraction"] > summaries[0]["busy_fraction"]  # the slow stage is the bottleneck


@pytest.mark.slow
@pytest.mark.parametrize("segments", [3, 4])
def test_async_k3_k4_reach_the_local_accuracy_band(tmp_path, segments: int) -> None:
    """Async Ray loses no more accuracy than its staleness explains, seed by seed.

    The reference is the local engine holding every SG target K-1 steps: the latest a
    target can come with K steps in flight (the automatic limit for true targets), where
    Ray's stages see 0.7-2.4 steps on average. So the band measures what the engine adds
    beyond the staleness itself, and the reference does not depend on the run's timing.
    Each seed is compared with its own reference (one seed alone moves the local engine by
    about 3 points at K=4: 0.989 at seed 0, 0.962 at seed 1). Both sides are read as the
    mean test accuracy of the last three epochs: one epoch's figure swings 1-5 points in an
    async run (0.880 at epoch 19 then 0.929 at 20, K=4), and a final epoch caught in such a
    swing read as a failed run. Two seeds of three must be in the band: the async runs have
    a tail (K=4 seed 1, eight runs on a loaded machine: 0.915-0.947 against 0.942 for the
    reference) that this test tolerates once, not twice.
    """
    results = []
    for seed in (0, 1, 2):
        common = (SETTLED, f"segments={segments}", f"seed={seed}")
        train(config(*RAY, *common, f"out={tmp_path / 'ray'}"))
        train(config(*common, f"sg.delay={segments - 1}", f"out={tmp_path / 'local'}"))
        results.append((_settled_accuracy(tmp_path / "ray"), _settled_accuracy(tmp_path / "local")))
    in_band = [ray_accuracy >= local_accuracy - 0.02 for ray_accuracy, local_accuracy in results]
    assert sum(in_band) >= 2, results


@pytest.mark.slow
@pytest.mark.parametrize("method", ["backprop", "sg-prop", "fa", "dfa", "kickback", "ddg"])
def test_every_method_runs_on_the_engine(tmp_path, method: str) -> None:
    summary = train(config(*RAY, f"method={method}", "segments=3", "epochs=3", f"out={tmp_path}"))
    assert summary["test_accuracy"] > 0.5
    assert all(s["steps"] == summary["steps"] and s["dropped_targets"] == 0 for s in summary["stages"])


def test_nccl_without_a_gpu_per_stage_is_a_one_line_config_error() -> None:
    from dni_dist.builder import load_data
    from dni_dist.errors import ConfigError

    cfg = config(*RAY, "transport=nccl")
    with pytest.raises(ConfigError, match="transport=nccl needs one GPU per stage"):
        RayRun(cfg, load_data(cfg))
    assert wait_for(lambda: ray.available_resources().get("CPU") == 2, seconds=20)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to give each stage its own")
def test_pin_cpus_on_gives_each_stage_a_core_of_its_own_or_stops_in_one_line(tmp_path) -> None:
    from dni_dist.builder import load_data
    from dni_dist.engines.affinity import CoreClaim
    from dni_dist.errors import ConfigError

    cores = sorted(os.sched_getaffinity(0))
    pin = ("dist.pin_cpus=on", f"dist.core_claims_dir={tmp_path / 'claims'}")
    summary = train(config(*RAY, *pin, "dist.compute_nice_offset=5", "segments=2", "epochs=1", f"out={tmp_path}"))
    assert [s["cpu_affinity"] for s in summary["stages"]] == [cores[:1], cores[1:2]]
    # ... and each compute thread runs nicer than its link threads (dist.compute_nice_offset=5)
    assert [s["compute_niceness"] for s in summary["stages"]] == [5, 5]
    assert summary["test_accuracy"] > 0.5
    # Another run holds every core but the first: stage 0 takes that one, stage 1 finds none.
    other = CoreClaim(tmp_path / "claims")
    assert other.claim(cores[1:], 0, len(cores) - 1) == cores[1:]
    cfg = config(*RAY, *pin, "segments=2")
    with pytest.raises(ConfigError, match=r"dist.pin_cpus=on: stage 1 needs 1 core\(s\) of its own") as caught:
        RayRun(cfg, load_data(cfg))
    assert "\n" not in str(caught.value) and f"use {len(cores)} core(s), 0 of them free" in str(caught.value)
    other.release()
    assert wait_for(lambda: ray.available_resources().get("CPU") == 2, seconds=20)


def test_summary_reports_the_in_flight_limit_and_pending_memory(tmp_path) -> None:
    summary = train(config(*RAY, "segments=3", "epochs=1", f"out={tmp_path}"))
    low, mid, top = summary["stages"]
    assert (low["in_flight_limit"], low["in_flight_bound"]) == (3, "pipeline")  # K, true targets
    assert mid["in_flight_limit"] is None and top["in_flight_limit"] is None  # only stage 0 feeds
    assert mid["pending_step_limit"] == (1 << 30) // mid["pending_step_bytes"]  # 1 GiB on a CPU
    assert 1 <= low["peak_pending_steps"] <= 3 and 1 <= mid["peak_pending_steps"] <= 3
    assert low["pending_step_bytes"] == 64 * (64 + 256 + 10) * 4  # digits input, activation, context
    assert mid["pending_step_bytes"] > low["pending_step_bytes"]  # its graph and stashed weights
    for s in (low, mid):
        assert s["peak_pending_bytes"] == s["peak_pending_steps"] * s["pending_step_bytes"]
    assert top["peak_pending_steps"] == top["pending_step_bytes"] == 0


def test_a_memory_budget_lowers_the_in_flight_limit(tmp_path) -> None:
    summary = train(config(*RAY, "segments=3", "epochs=1", "dist.pending_memory=200000", f"out={tmp_path}"))
    low = summary["stages"][0]
    assert (low["in_flight_limit"], low["in_flight_bound"]) == (200000 // low["pending_step_bytes"], "memory")
    assert low["peak_pending_steps"] <= low["in_flight_limit"]


def test_a_polled_run_gets_each_epochs_metrics_with_its_results(monkeypatch) -> None:
    """With a monitor polling around every epoch, the stages' end-of-epoch snapshots come back
    with the epoch's results and answer polls until the stages change: no round trip."""
    from dni_dist.builder import load_data

    cfg = config(*RAY, "segments=2")
    run = RayRun(cfg, load_data(cfg))
    real_get, gets = ray.get, []

    def counting_get(*args, **kwargs):
        gets.append(1)
        return real_get(*args, **kwargs)

    try:
        run.snapshot_with_epochs = True
        run.train_epoch(0)
        fresh = real_get([a.snapshot.remote() for a in run.actors])
        monkeypatch.setattr(ray, "get", counting_get)
        served = run.snapshots()
        assert not gets  # answered without asking the stages
        assert [s["counters"] for s in served] == [s["counters"] for s in fresh]
        assert served[-1]["counters"]["steps"] == run.step
        assert all("snapshot" not in report for report in run.epoch_reports[-1])
        monkeypatch.setattr(ray, "get", real_get)
        run.restore(run.state_handles(), run.step)  # the stages' state was replaced: ask them
        monkeypatch.setattr(ray, "get", counting_get)
        assert [s["counters"]["steps"] for s in run.snapshots()] == [s["counters"]["steps"] for s in fresh]
        assert gets
    finally:
        monkeypatch.setattr(ray, "get", real_get)
        run.close()


def test_auto_takes_shared_memory_on_one_node_of_a_ray_the_run_did_not_start() -> None:
    """As on a one-node cluster joined by address: the tests' Ray is not the run's own."""
    from dni_dist.builder import load_data
    from dni_dist.engines.ray_engine import ask_node_for_shm_room, owns_ray
    from dni_dist.transports.base import Stream

    assert not owns_ray()
    cfg = config("runtime=ray", "dist.cpus_per_stage=0.5", "segments=2")
    assert cfg.transport == "auto"
    run = RayRun(cfg, load_data(cfg))
    try:
        assert run.config.transport == "shm" and run.requested_transport == "auto"
        losses = run.train_epoch(0)
        assert len(losses) == run.steps_per_epoch
    finally:
        run.close()
    # the question as a node that is not the driver's gets it: a task placed on that node
    streams = [Stream(0, 1, True, (64, 256), (64,)), Stream(1, 0, False, (64, 256))]
    node = ray.get_runtime_context().get_node_id()
    assert ask_node_for_shm_room(node, streams, 4, timeout=30)
    assert not ask_node_for_shm_room("ab" * 28, streams, 4, timeout=30)  # no such node: gloo
    assert not ask_node_for_shm_room("", streams, 4, timeout=30)  # a bundle with no node in the table


def test_a_restart_over_shared_memory_wires_new_rings_and_leaves_none_behind() -> None:
    from pathlib import Path

    from dni_dist.builder import load_data

    shm = Path("/dev/shm")
    before = set(shm.glob("dni-*")) if shm.is_dir() else set()
    cfg = config(*RAY, "transport=shm", "segments=3")  # a middle stage: two inbound rings
    run = RayRun(cfg, load_data(cfg))
    try:
        run.train_epoch(0)
        run.restart()  # every actor replaced: a new generation, new rings
        losses = run.train_epoch(1)
        assert len(losses) == run.steps_per_epoch and all(loss == loss for loss in losses)
        assert all(s["transport"]["messages_received"] > 0 for s in run.stage_summaries())
    finally:
        run.close()
    if shm.is_dir():
        assert set(shm.glob("dni-*")) == before
