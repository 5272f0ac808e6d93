"""The stage loop over the in-process transport (threads): fast checks of the distributed
schedules without Ray or sockets."""

from __future__ import annotations

import pytest
import torch
from conftest import config
from helpers import flat_params, local_params
from threaded import run_threaded

CASES = [
    ("method=sg", "sg.target=true", "segments=3"),
    ("method=sg", "sg.target=bootstrap", "segments=3"),
    ("method=sg", "sg.target=lambda", "segments=4"),
    ("method=sg-prop", "segments=3"),
    ("method=backprop", "segments=3"),
    ("method=fa", "segments=2"),
    ("method=dfa", "segments=3"),
    ("method=kickback", "segments=3"),
    ("method=ddg", "segments=3"),
    ("method=fdg", "segments=3"),
    ("method=sg", "sg.target=lambda", "segments=4", "precision=bf16"),
    ("method=ddg", "segments=3", "stash_versions=1"),
]


@pytest.mark.parametrize("overrides", CASES, ids=lambda c: "-".join(v.split("=")[1] for v in c))
def test_lockstep_loop_equals_the_local_engine(overrides: tuple[str, ...]) -> None:
    stages, _, _ = run_threaded(config(*overrides), "lockstep", epochs=2)
    torch.testing.assert_close(flat_params(stages), local_params(overrides, epochs=2), rtol=0, atol=0)


@pytest.mark.parametrize("overrides", CASES, ids=lambda c: "-".join(v.split("=")[1] for v in c))
def test_async_loop_processes_every_step_once(overrides: tuple[str, ...]) -> None:
    stages, _, data = run_threaded(config(*overrides), "async", epochs=2)
    steps = 2 * (len(data.x_train) // 64)
    for stage in stages:
        s = stage.stats
        assert s.steps == steps and s.dropped_targets == 0 and s.evicted_steps == 0
        assert stage.pending_steps == 0  # every step got all its targets
        if stage.boundary is not None and stage.boundary.learned:
            assert s.sg_updates == steps


def test_a_slow_stage_keeps_the_fast_ones_bounded() -> None:
    cfg = config("segments=2", "dist.max_in_flight=2")
    stages, reports, _ = run_threaded(cfg, "async", epochs=1, slow={1: 0.01})
    fast = reports[0][0]
    assert fast.max_pending <= 2
    assert fast.max_queued <= 2 * 4 + 1  # inbox + one outbox, each of capacity 4
    assert stages[0].stats.steps == stages[1].stats.steps == 1347 // 64
