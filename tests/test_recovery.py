"""Checkpoints, resume and numeric faults on the local engine (the Ray side is in
test_ray_recovery.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import config

from dni_dist.builder import load_data
from dni_dist.engines.shards import ShardRecord, write_shard
from dni_dist.errors import ConfigError, RunFailed, SnapshotLost, StageLost
from dni_dist.operations import checkpoint
from dni_dist.operations.recovery import CheckpointKeeper
from dni_dist.runner import train

RUN = ("method=sg", "segments=3", "sg.target=true", "data.batch_size=128", "optim.lr=0.003")


def _final_states(directory) -> list[dict]:
    _, states, _ = checkpoint.load(checkpoint.latest(directory))
    return states


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=where)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a.keys() - {"compute_seconds", "step_seconds"}:  # wall-clock timings, not state
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resume_gives_the_uninterrupted_result(tmp_path) -> None:
    whole = train(config(*RUN, "epochs=4", f"out={tmp_path / 'whole'}", f"checkpoint.dir={tmp_path / 'ck-whole'}"))
    # The interrupted run checkpoints every 4 steps (mid-epoch) and stops after 2 epochs.
    first = config(*RUN, "epochs=2", f"out={tmp_path / 'part'}", f"checkpoint.dir={tmp_path / 'ck'}")
    first.checkpoint.every = 4
    train(first)
    resumed = train(
        config(
            *RUN, "epochs=4", f"out={tmp_path / 'part'}", f"checkpoint.dir={tmp_path / 'ck'}", "checkpoint.resume=true"
        )
    )
    assert resumed["resumed_from"].endswith(f"step-{2 * (1347 // 128):09d}")
    assert resumed["steps"] == whole["steps"] == 4 * (1347 // 128)
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    # every parameter, optimiser moment, RNG state and counter is the same
    got, want = _final_states(tmp_path / "ck"), _final_states(tmp_path / "ck-whole")
    _assert_same(got, want)
    # the log goes on: 4 epoch records in all
    log = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [1, 2, 3, 4]


def test_checkpoints_are_complete_pruned_and_loadable(tmp_path) -> None:
    cfg = config(*RUN, "epochs=2", f"out={tmp_path}", f"checkpoint.dir={tmp_path / 'ck'}", "checkpoint.keep=2")
    cfg.checkpoint.every = 5
    train(cfg)
    kept = checkpoint.list_checkpoints(tmp_path / "ck")
    assert [p.name for p in kept] == ["step-000000015", "step-000000020"]  # newest two of 5, 10, 15, 20
    assert not list((tmp_path / "ck").glob(".tmp-*"))
    position, states, saved = checkpoint.load(kept[-1])
    assert position == checkpoint.Position(epoch=2, offset=0, step=20)
    assert len(states) == 3 and saved["method"] == "sg"
    assert {"module", "boundary", "optimizer", "sg_optimizer", "update_rng", "clock", "stats"} <= states[0].keys()


def test_resume_refuses_a_different_model_or_a_missing_checkpoint(tmp_path) -> None:
    train(config(*RUN, "epochs=1", f"out={tmp_path}", f"checkpoint.dir={tmp_path / 'ck'}"))
    other = config(*RUN, "epochs=2", "model.width=128", f"out={tmp_path}", f"checkpoint.dir={tmp_path / 'ck'}")
    other.checkpoint.resume = True
    with pytest.raises(ConfigError, match="model="):
        train(other)
    empty = config(*RUN, f"out={tmp_path}", f"checkpoint.dir={tmp_path / 'none'}", "checkpoint.resume=true")
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(empty)
    with pytest.raises(ConfigError, match=r"checkpoint\.dir"):
        config("checkpoint.resume=true")


def test_non_finite_steps_are_skipped_then_stop_the_run_with_a_checkpoint(tmp_path, monkeypatch) -> None:
    cfg = config(*RUN, "epochs=3", f"out={tmp_path}", "nan_limit=3")
    clean = load_data(cfg)

    def poisoned(config):  # from epoch 2 on every input is NaN
        data = load_data(config)
        data.x_train = data.x_train.clone()
        return data

    monkeypatch.setattr("dni_dist.runner.load_data", poisoned)
    calls = {"n": 0}
    from dni_dist.engines import local_run

    original = local_run.LocalRun.train_steps

    def train_steps(self, epoch, offset, count):
        if epoch == 1 and calls["n"] == 0:
            calls["n"] = 1
            self.dataset.x_train[:] = math.nan
        return original(self, epoch, offset, count)

    monkeypatch.setattr(local_run.LocalRun, "train_steps", train_steps)
    with pytest.raises(RunFailed, match="non-finite") as info:
        train(cfg)
    message = str(info.value)
    assert "last good checkpoint" in message and "\n" not in message
    saved = checkpoint.latest(tmp_path / "checkpoints")
    position, states, _ = checkpoint.load(saved)
    assert position.step == 1347 // 128  # the state after epoch 1, before the NaNs
    for state in states:
        for tensor in state["module"].values():
            assert torch.isfinite(tensor).all()
    assert clean.x_train.isfinite().all()


def test_one_non_finite_step_is_skipped_and_counted(tmp_path) -> None:
    from helpers import stages_for

    from dni_dist.engines.local import LocalEngine

    stages, data = stages_for(*RUN)
    engine = LocalEngine(stages)
    x, y = data.x_train[:128], data.y_train[:128]
    engine.train_step(x, y)
    before = [p.detach().clone() for s in stages for p in s.module.parameters()]
    bad = x.clone()
    bad[0, 0] = math.inf
    engine.train_step(bad, y)
    after = [p.detach() for s in stages for p in s.module.parameters()]
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # no stage updated from the bad step
    # The skip happened on the device: Adam's step count did not advance either.
    assert all(int(state["step"]) == 1 for s in stages for state in s.optimizer.state.values())
    engine.check_numerics()  # the count is read back when an engine polls, not per step
    assert all(s.stats.nonfinite_steps == 1 for s in stages)
    engine.train_step(x, y)  # and the next clean step trains again
    again = [p.detach() for s in stages for p in s.module.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, again, strict=True))


def test_sg_clip_bounds_each_examples_synthetic_gradient() -> None:
    from helpers import stages_for

    stages, _ = stages_for(*RUN, "sg.clip=0.5")
    stage = stages[0]
    signal = torch.randn(8, 16) * 10 / 8  # per-example SG outputs, divided by the batch size
    clipped = stage._clip(signal)
    assert torch.all(clipped.norm(dim=1) * 8 <= 0.5 + 1e-5)
    assert stage.stats.clipped_signals == 8


class _EngineThatLosesItsSnapshot:
    """An engine whose in-memory snapshot is gone when a restart needs it (its node died)."""

    def __init__(self) -> None:
        self.step = 0
        self.loaded: list[tuple[list, int]] = []

    def state_handles(self) -> list[str]:
        return ["ref-0", "ref-1"]

    def restore(self, states, step: int) -> None:
        raise SnapshotLost(f"the snapshot of step {step} is lost (OwnerDiedError)")

    def write_shards(self, directory, handles=None, by_stages=True):
        return [write_shard({"w": torch.full((2,), float(i))}, directory, i) for i in range(2)]

    def load_shards(self, paths, step: int) -> None:
        self.loaded.append((paths, step))

    def check_shared(self, directory) -> None:
        pass

    def restart(self) -> None:
        pass


def test_a_lost_snapshot_falls_back_to_the_checkpoint_on_disk(tmp_path) -> None:
    keeper = CheckpointKeeper(config(*RUN, f"out={tmp_path}", f"checkpoint.dir={tmp_path / 'ck'}"), 10)
    engine = _EngineThatLosesItsSnapshot()
    keeper.start(engine)
    keeper.after_chunk(engine, checkpoint.Position(0, 5, 5))
    position = keeper.recover(engine, StageLost("stage 1's actor died"), failed_chunk=3)
    assert position == checkpoint.Position(0, 5, 5)
    [(paths, step)] = engine.loaded
    assert step == 5 and [p.name for p in paths] == ["stage-0.pt", "stage-1.pt"]
    assert keeper.redone_steps == 3


def test_a_lost_snapshot_without_a_checkpoint_stops_the_run_with_one_line(tmp_path) -> None:
    keeper = CheckpointKeeper(config(*RUN, f"out={tmp_path}"), 10)
    engine = _EngineThatLosesItsSnapshot()
    keeper.start(engine)
    keeper.after_chunk(engine, checkpoint.Position(0, 5, 5))
    with pytest.raises(RunFailed, match="no checkpoint is on disk") as info:
        keeper.recover(engine, StageLost("stage 1's actor died"), failed_chunk=3)
    assert "snapshot of step 5 is lost" in str(info.value) and "\n" not in str(info.value)


def test_checkpoints_without_a_shard_list_still_load_and_short_shards_are_refused(tmp_path) -> None:
    states = [{"w": torch.arange(3.0)}, {"w": torch.ones(2)}]
    path = checkpoint.save(tmp_path, checkpoint.Position(1, 0, 7), states, {"method": "sg"})
    meta = json.loads((path / "meta.json").read_text())
    del meta["shards"]  # as written before shards were recorded
    (path / "meta.json").write_text(json.dumps(meta))
    position, loaded, _ = checkpoint.load(path)
    assert position.step == 7
    _assert_same(loaded, states)
    # A writer that reports more bytes than the driver finds (it wrote elsewhere): no checkpoint.
    tmp = checkpoint.begin(tmp_path / "other", 8)
    record = write_shard(states[0], tmp, 0)
    with pytest.raises(RuntimeError, match="bytes written"):
        checkpoint.commit(tmp, checkpoint.Position(1, 1, 8), [ShardRecord(record.file, record.bytes + 1)], {})
    assert checkpoint.latest(tmp_path / "other") is None
