"""Fault tolerance of the Ray engine: resume, a killed stage process, a dropped link."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import ray
import torch
from conftest import config
from helpers import start_local_ray

from dni_dist.errors import ConfigError, RunFailed, SnapshotLost
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


def _kill_stage_1_after_an_epoch(cfg, out) -> dict:
    """Run ``cfg`` in a thread, SIGKILL stage 1's process once an epoch is logged in ``out``;
    the run's summary (it must finish, without an error)."""
    thread, outcome = _in_thread(cfg)
    pid = ray.get(_stage_actor(1).pid.remote())
    _when_epochs_logged(out, 1)
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive(), "the run hung after a stage was killed"
    assert "error" not in outcome, outcome.get("error")
    return outcome["summary"]


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
    summary = _kill_stage_1_after_an_epoch(cfg, tmp_path)
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


def _tensors_in(obj, seen: set[int] | None = None) -> int:
    """How many torch tensors ``obj`` holds, looking through containers and objects' fields."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(_tensors_in(k, seen) + _tensors_in(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set)):
        return sum(_tensors_in(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return _tensors_in(vars(obj), seen)
    return 0


def test_stages_write_their_own_shards_and_a_killed_stage_is_restored_from_object_refs(tmp_path, monkeypatch) -> None:
    """The driver keeps refs and paths, never tensors: it writes no shard itself, and a
    stage killed mid-run is restored from the refs (not from disk)."""
    from dni_dist.engines.ray_engine import RayRun
    from dni_dist.operations.recovery import CheckpointKeeper

    held: list[tuple[int, bool]] = []  # (tensors the keeper holds, all handles are refs) per chunk
    restored_from: list[str] = []

    class WatchedKeeper(CheckpointKeeper):
        def after_chunk(self, engine, position):
            written = super().after_chunk(engine, position)
            held.append((_tensors_in(self), all(isinstance(h, ray.ObjectRef) for h in self._snapshot[1])))
            return written

        def recover(self, engine, lost, failed_chunk):
            handles = self._snapshot[1]
            restored_from.append("refs" if all(isinstance(h, ray.ObjectRef) for h in handles) else "other")
            return super().recover(engine, lost, failed_chunk)

    def no_driver_save(*args, **kwargs):
        raise AssertionError("the driver wrote a shard itself")

    def no_disk_restore(self, paths, step):
        raise AssertionError("a restart went to disk although the snapshot refs were there")

    monkeypatch.setattr("dni_dist.runner.CheckpointKeeper", WatchedKeeper)
    # In this process only (the actors are others): the driver's two ways to write a shard.
    monkeypatch.setattr("dni_dist.engines.ray_engine.write_shard", no_driver_save)
    monkeypatch.setattr("dni_dist.operations.checkpoint.write_shard", no_driver_save)
    monkeypatch.setattr(RayRun, "load_shards", no_disk_restore)
    ck = tmp_path / "ck"
    # Pinned where the machine has a core per stage: the restarted stages claim the cores
    # of the ones they replace, which may still be exiting.
    cores = sorted(os.sched_getaffinity(0))
    pin = ["dist.pin_cpus=on", f"dist.core_claims_dir={tmp_path / 'claims'}"] if len(cores) >= 2 else []
    cfg = config(
        *RAY,
        *pin,
        "segments=2",
        "epochs=2",
        "dist.slow_stage=1",
        "dist.slow_seconds=0.03",
        f"out={tmp_path}",
        f"checkpoint.dir={ck}",
        "checkpoint.every=5",
    )
    summary = _kill_stage_1_after_an_epoch(cfg, tmp_path)
    assert summary["restarts"] == 1 and restored_from == ["refs"]
    if pin:
        assert [stage["cpu_affinity"] for stage in summary["stages"]] == [cores[:1], cores[1:2]]
    assert summary["steps"] == 2 * STEPS
    assert all(stage["steps"] == 2 * STEPS for stage in summary["stages"])  # counters came from the refs
    assert held and all(count == 0 and refs for count, refs in held), held
    # Every checkpoint was written by the stages: meta.json names each shard and its size.
    newest = checkpoint.latest(ck)
    meta = json.loads((newest / "meta.json").read_text())
    assert [s["file"] for s in meta["shards"]] == ["stage-0.pt", "stage-1.pt"]
    assert all((newest / s["file"]).stat().st_size == s["bytes"] for s in meta["shards"])
    assert checkpoint.load(newest)[0].step == 2 * STEPS


@pytest.mark.slow
def test_a_checkpoint_written_by_either_engine_resumes_on_the_other(tmp_path) -> None:
    """Shards are engine-neutral: Ray (lockstep) -> local and local -> Ray both end with the
    parameters of an uninterrupted local run."""
    run = ("method=sg", "sg.target=true", "segments=3")
    ray_run = (*run, *RAY, "dist.schedule=lockstep")
    train(config(*run, "epochs=2", f"out={tmp_path / 'whole'}", f"checkpoint.dir={tmp_path / 'ck-whole'}"))
    _, want, _ = checkpoint.load(checkpoint.latest(tmp_path / "ck-whole"))
    for first, then, name in ((ray_run, run, "ray-then-local"), (run, ray_run, "local-then-ray")):
        out, ck = f"out={tmp_path / name}", f"checkpoint.dir={tmp_path / name / 'ck'}"
        train(config(*first, "epochs=1", out, ck))
        resumed = train(config(*then, "epochs=2", out, ck, "checkpoint.resume=true"))
        assert resumed["resumed_from"].endswith(f"step-{STEPS:09d}") and resumed["steps"] == 2 * STEPS
        _, got, _ = checkpoint.load(checkpoint.latest(tmp_path / name / "ck"))
        for a, b in zip(got, want, strict=True):
            for part in ("module", "boundary"):
                for key, tensor in (b[part] or {}).items():
                    torch.testing.assert_close(a[part][key], tensor, msg=f"{name}: {part}.{key}")


def test_a_checkpoint_dir_a_stage_cannot_see_stops_the_run_with_one_line(tmp_path, monkeypatch) -> None:
    from dni_dist.engines import shards

    def elsewhere(directory):  # as if the stages' node mounted another directory at that path
        path, token = shards.write_token(directory)
        path.write_text("another disk")
        return path, token

    monkeypatch.setattr("dni_dist.engines.ray_engine.write_token", elsewhere)
    ck = tmp_path / "ck"
    with pytest.raises(ConfigError, match="not the driver's directory on node") as info:
        train(config(*RAY, "segments=2", "epochs=1", f"out={tmp_path}", f"checkpoint.dir={ck}"))
    message = str(info.value)
    assert str(ck) in message and "NFS" in message and "\n" not in message
    assert checkpoint.latest(ck) is None and not list(ck.iterdir())  # nothing trained, no token left


def _wait_until_lost(ref: ray.ObjectRef, patience: float) -> None:
    """Until Ray reports ``ref``'s object lost. Ray learns of an owner's death
    asynchronously: on this machine 1.4-2.5 s after ``ray.kill``, and until then the object
    is still served from the object store (a fixed one-second sleep made this test flaky)."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        try:
            ray.get(ref, timeout=1.0)
        except ray.exceptions.ObjectLostError:
            return
        except ray.exceptions.GetTimeoutError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"the object of a killed owner was still served after {patience} s")


def test_snapshot_refs_are_written_by_the_stages_or_the_driver_and_a_lost_one_is_reported(tmp_path) -> None:
    """save_last's two writers (the live stages; the driver for a dead one) write the
    snapshot; refs whose objects are gone (their owner or node died) raise SnapshotLost
    at once instead of waiting."""
    from dni_dist.builder import load_data
    from dni_dist.engines.ray_engine import RayRun

    @ray.remote(num_cpus=0)
    class Holder:  # owns what it puts: its death loses the object, as a node's death would
        def hold(self):
            return [ray.put({"x": torch.zeros(3)})]

    cfg = config(*RAY, "segments=2", "dist.timeout=20")
    engine = RayRun(cfg, load_data(cfg))
    try:
        engine.train_steps(0, 0, 2)
        handles = engine.state_handles()
        want = engine.stage_states()
        engine.train_steps(0, 2, 2)  # the stages move on; the snapshot is what gets written
        for name, by_stages in (("stages", True), ("driver", False)):
            tmp = checkpoint.begin(tmp_path / name, 2)
            shards = engine.write_shards(tmp, handles, by_stages)
            _, got, _ = checkpoint.load(checkpoint.commit(tmp, checkpoint.Position(0, 2, 2), shards, {}))
            for a, b in zip(got, want, strict=True):
                for key, tensor in b["module"].items():
                    torch.testing.assert_close(a["module"][key], tensor, rtol=0, atol=0, msg=f"{name}: {key}")
        holder = Holder.remote()
        [lost] = ray.get(holder.hold.remote())
        ray.kill(holder)
        _wait_until_lost(lost, patience=30.0)
        with pytest.raises(SnapshotLost):
            engine.restore([lost, lost], 0)
        ray.kill(engine.actors[1])  # restarts exhausted: stage 1 is gone, its snapshot is not
        tmp = checkpoint.begin(tmp_path / "one-dead", 2)
        assert [s.file for s in engine.write_shards(tmp, handles, by_stages=True)] == ["stage-0.pt", "stage-1.pt"]
    finally:
        engine.close()
