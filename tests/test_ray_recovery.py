"""Fault tolerance of the Ray engine: resume, a killed stage process, a dropped link."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray
import torch
from conftest import config
from helpers import start_local_ray

from dni_dist.errors import RunFailed
from dni_dist.operations import checkpoint
from dni_dist.runner import train

RAY = ("runtime=ray", "transport=gloo", "dist.cpus_per_stage=0.5", "dist.timeout=60")
STEPS = 1347 // 64


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    start_local_ray()
    yield
    ray.shutdown()


def _stage_actor(stage: int, seconds: float = 60):
    """The live actor of ``stage`` of the one run going on (actors are named dni-RUN-gGEN-stageI)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("dni-")]
        names = [n for n in names if n.endswith(f"-g0-stage{stage}")]
        if names:
            return ray.get_actor(names[0])
        time.sleep(0.1)
    raise AssertionError("no stage actor appeared")


def _when_epochs_logged(out, epochs: int, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        log = out / "metrics.jsonl"
        if log.exists() and log.read_text().count('"event": "epoch"') >= epochs:
            return
        time.sleep(0.05)
    raise AssertionError(f"{epochs} epochs were not logged in {seconds} s")


def _in_thread(cfg) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = train(cfg)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_lockstep_resume_over_gloo_gives_the_uninterrupted_parameters(tmp_path) -> None:
    run = (*RAY, "dist.schedule=lockstep", "method=sg", "segments=3")
    train(config(*run, "epochs=2", f"out={tmp_path / 'a'}", f"checkpoint.dir={tmp_path / 'ck-a'}"))
    train(config(*run, "epochs=1", f"out={tmp_path / 'b'}", f"checkpoint.dir={tmp_path / 'ck-b'}"))
    resumed = train(
        config(
            *run, "epochs=2", f"out={tmp_path / 'b'}", f"checkpoint.dir={tmp_path / 'ck-b'}", "checkpoint.resume=true"
        )
    )
    assert resumed["steps"] == 2 * STEPS
    _, whole, _ = checkpoint.load(checkpoint.latest(tmp_path / "ck-a"))
    _, parts, _ = checkpoint.load(checkpoint.latest(tmp_path / "ck-b"))
    for a, b in zip(whole, parts, strict=True):
        for part in ("module", "boundary"):
            for name, tensor in (a[part] or {}).items():  # the top stage has no boundary
                torch.testing.assert_close(b[part][name], tensor, msg=f"{part}.{name}")


@pytest.mark.slow
def test_a_stage_killed_mid_epoch_is_restarted_and_the_run_finishes(tmp_path) -> None:
    cfg = config(*RAY, "segments=2", "epochs=4", "dist.slow_stage=1", "dist.slow_seconds=0.03", f"out={tmp_path}")
    thread, outcome = _in_thread(cfg)
    victim = _stage_actor(1)
    pid = ray.get(victim.pid.remote())
    _when_epochs_logged(tmp_path, 1)
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive(), "the run hung after a stage was killed"
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary["restarts"] == 1
    assert 0 < summary["redone_steps"] <= STEPS
    assert summary["steps"] == 4 * STEPS
    for stage in summary["stages"]:
        # the counters came back from the snapshot: every step counted once in the end
        assert stage["steps"] == 4 * STEPS
    assert summary["test_accuracy"] > 0.8


def _drop_grpc_link_after_one_epoch(tmp_path, *overrides: str) -> dict:
    """A gRPC run whose stage 1 stops its server after epoch 1; returns how the run ended."""
    cfg = config(
        *RAY,
        "transport=grpc",
        "segments=2",
        "dist.slow_stage=1",
        "dist.slow_seconds=0.03",
        f"out={tmp_path}",
        *overrides,
    )
    thread, outcome = _in_thread(cfg)
    victim = _stage_actor(1)
    _when_epochs_logged(tmp_path, 1)
    ray.get(victim.drop_links.remote())
    thread.join(timeout=200)
    assert not thread.is_alive(), "the run hung after a link dropped"
    return outcome


@pytest.mark.slow
def test_a_dropped_grpc_link_stops_cleanly_with_a_checkpoint_when_restarts_are_off(tmp_path) -> None:
    outcome = _drop_grpc_link_after_one_epoch(tmp_path, "epochs=4", "dist.max_restarts=0")
    error = outcome.get("error")
    assert isinstance(error, RunFailed), outcome
    assert "gave up after 0 restarts" in str(error)
    saved = checkpoint.latest(tmp_path / "checkpoints")
    assert saved is not None and checkpoint.load(saved)[0].step >= STEPS


@pytest.mark.slow
def test_a_dropped_grpc_link_is_recovered_by_a_restart(tmp_path) -> None:
    outcome = _drop_grpc_link_after_one_epoch(tmp_path, "epochs=3")
    summary = outcome.get("summary")
    assert summary is not None, outcome
    assert summary["restarts"] == 1 and summary["steps"] == 3 * STEPS
