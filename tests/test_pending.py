"""Steps in flight: the automatic limit, its memory bound, and what a waiting step holds."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import config
from threaded import run_threaded

from dni_dist.core.pending import CPU_PENDING_MEMORY, auto_in_flight, in_flight_limit, pending_budget, steps_within
from dni_dist.runner import train

PENDING_KEYS = {"in_flight_limit", "in_flight_bound", "pending_step_limit"}
PENDING_KEYS |= {"pending_step_bytes", "pending_stash_bytes", "peak_pending_steps", "peak_pending_bytes"}


@pytest.mark.parametrize(
    ("k", "mode", "expected"),
    [
        *[(1, "true", 1), (2, "true", 2), (4, "true", 4), (8, "true", 8), (4, "lambda", 4), (8, "lambda", 8)],
        *[(2, "bootstrap", 2), (4, "bootstrap", 2), (8, "bootstrap", 2)],
    ],
)
def test_auto_is_the_round_trip_of_a_target(k: int, mode: str, expected: int) -> None:
    assert auto_in_flight(k, mode) == expected
    assert in_flight_limit(0, k, mode, 1 << 40, 1000) == (expected, "pipeline")


def test_explicit_values_are_kept_and_memory_bounds_only_the_automatic_one() -> None:
    assert in_flight_limit(2, 8, "true", 1, 10**9) == (2, "explicit")
    assert in_flight_limit(0, 8, "true", 5000, 1000) == (5, "memory")
    assert in_flight_limit(0, 8, "true", 10, 1000) == (1, "memory")  # never below one step
    assert in_flight_limit(0, 8, "true", 5000, None) == (8, "pipeline")  # not measured yet
    assert pending_budget(0, torch.device("cpu")) == CPU_PENDING_MEMORY
    assert pending_budget(12345, torch.device("cpu")) == 12345


def test_a_bounded_stash_lets_more_steps_fit_the_budget() -> None:
    # A step with a weight copy holds 1000 bytes, 600 of them the copy and its graph.
    assert steps_within(10_000, 1000, 600, 0) == 10  # every step keeps a copy
    assert steps_within(10_000, 1000, 600, 2) == 2 + 8000 // 400  # two copies, then 400 a step
    assert steps_within(1_500, 1000, 600, 2) == 1  # the budget ends inside the copies
    assert steps_within(10_000, 1000, 0, 2) == 10  # nothing stashed: the old count
    assert in_flight_limit(0, 64, "true", 10_000, 1000, 600, 2) == (22, "memory")
    assert in_flight_limit(0, 64, "true", 10_000, 1000, 600, 0) == (10, "memory")
    assert in_flight_limit(0, 8, "true", 10_000, 1000, 600, 2) == (8, "pipeline")  # 22 fit, 8 needed


def test_local_summary_reports_what_a_waiting_step_holds(tmp_path) -> None:
    width, batch = 32, 64
    cfg = config("segments=3", "epochs=1", "model.depth=2", f"model.width={width}", f"out={tmp_path}")
    train(cfg)
    stages = json.loads((tmp_path / "summary.json").read_text())["stages"]
    assert all(s.keys() >= PENDING_KEYS for s in stages)
    assert all(s["in_flight_limit"] is None for s in stages)  # lockstep: no limit applies
    low, mid, top = stages
    assert low["peak_pending_steps"] == mid["peak_pending_steps"] == 1 and top["peak_pending_steps"] == 0
    # stage 0 keeps input (64 x 64 digits), activation and one-hot context; no graph after its update
    assert low["pending_step_bytes"] == batch * (64 + width + 10) * 4
    # stage 1 (Linear + ReLU) keeps its graph and stashed weights (true targets): the graph saved
    # x, the stashed weight and the ReLU output h, each counted once
    assert mid["pending_step_bytes"] == batch * (2 * width + 10) * 4 + (width * width + width) * 4
    assert mid["peak_pending_bytes"] == mid["pending_step_bytes"] and top["pending_step_bytes"] == 0
    # ... of which only the stashed weights are a stashed step's own (x and h are kept anyway)
    assert mid["pending_stash_bytes"] == (width * width + width) * 4 and low["pending_stash_bytes"] == 0


@pytest.mark.parametrize(("mode", "need"), [("true", 3), ("bootstrap", 2)])
def test_async_loop_uses_the_automatic_limit(mode: str, need: int) -> None:
    _, reports, _ = run_threaded(config("segments=3", f"sg.target={mode}"), "async", steps=20)
    assert max(r.max_pending for r in reports[0]) <= need


def test_a_small_memory_budget_lowers_the_limit() -> None:
    from dni_dist.engines import stage_loop

    cfg = config("segments=3", "dist.pending_memory=200000")  # stage 0 holds 84,480 bytes a step
    seen = []
    original = stage_loop.StageLoop._resolve_limit

    def spy(self, budget):
        original(self, budget)
        seen.append((self.stage.index, self.max_in_flight, self.in_flight_bound))

    try:
        stage_loop.StageLoop._resolve_limit = spy
        _, reports, _ = run_threaded(cfg, "async", steps=20)
    finally:
        stage_loop.StageLoop._resolve_limit = original
    assert (0, 2, "memory") in seen  # 200,000 // 84,480 = 2 < 3
    assert max(r.max_pending for r in reports[0]) <= 2


def test_stages_above_0_keep_their_waiting_steps_within_the_budget() -> None:
    # stage 1 (true targets) holds 396,800 bytes a step (graph and stashed weights), stage 0
    # 84,480: stage 0 may feed its 3, stage 1 holds an activation while 2 steps wait there
    cfg = config("segments=3", "dist.pending_memory=800000")
    stages, reports, _ = run_threaded(cfg, "async", steps=20)
    assert max(r.max_pending for r in reports[1]) <= 2
    assert max(r.max_pending for r in reports[0]) <= 3
    for stage in stages:  # nothing lost or evicted by the holding
        assert stage.stats.steps == 20 and stage.stats.dropped_targets == stage.stats.evicted_steps == 0
        assert stage.pending_steps == 0


def test_a_stage_with_a_bounded_stash_lets_more_steps_wait_in_the_same_budget() -> None:
    from helpers import stages_for

    from dni_dist.core.pending import PendingMeter
    from dni_dist.data import batches

    def meter_of(versions: int) -> PendingMeter:
        stages, data = stages_for("segments=3", "sg.target=true", f"stash_versions={versions}")
        x, y = next(batches(data.x_train, data.y_train, 64, 0, 0))
        (up,) = stages[0].forward(0, x, y)
        meter = PendingMeter()
        meter.forward(stages[1], 0, up.tensor, up.labels)
        return meter

    every, bounded = meter_of(0), meter_of(2)
    assert every.step_bytes == bounded.step_bytes and bounded.stash_bytes > 0  # the first step stashes
    budget = 10 * every.step_bytes
    assert every.steps_within(budget) == 10
    plain = bounded.step_bytes - bounded.stash_bytes
    assert bounded.steps_within(budget) == 2 + 8 * every.step_bytes // plain > 10
