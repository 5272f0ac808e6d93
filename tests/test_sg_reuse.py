"""An SG's output made for a step's update also trains the SG on that step's target, when
the SG has not learned in between: one SG forward a step instead of two, the same numbers."""

from __future__ import annotations

import pytest
import torch
from helpers import first_batch, flat_params, stages_for, train_steps
from threaded import run_threaded

from dni_dist.config import load_config
from dni_dist.core.messages import Kind
from dni_dist.engines.local import LocalEngine


def _count_sg_forwards(stage) -> list[int]:
    calls = [0]
    stage.boundary.sg.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(
    "overrides",
    [
        ("segments=2",),
        ("segments=3", "sg.target=true"),  # a middle stage stashes weights and passes gradients down
        ("segments=3", "sg.target=lambda"),
        ("segments=2", "sg.kind=lowrank", "precision=bf16"),
    ],
)
def test_lockstep_training_is_bitwise_the_same_with_the_kept_output(overrides: tuple[str, ...]) -> None:
    results = []
    for keep in (True, False):
        stages, data = stages_for(*overrides)
        for stage in stages[:-1]:
            assert stage.keeps_sg_prediction
            stage.keeps_sg_prediction = keep
        train_steps(LocalEngine(stages), data, steps=25)
        results.append(flat_params(stages))
    assert torch.equal(*results)


def test_lockstep_runs_the_sg_once_a_step() -> None:
    stages, data = stages_for("segments=2")
    calls = _count_sg_forwards(stages[0])
    train_steps(LocalEngine(stages), data, steps=10)
    assert calls[0] == 10


def test_an_sg_that_learned_after_the_update_runs_again_on_the_target() -> None:
    """Two steps in flight: step 1's update used the SG before it learned from step 0's
    target, so its training must not reuse that output; the result is a second forward's."""
    results, forwards = [], []
    for keep in (True, False):
        stages, data = stages_for("segments=2")
        low, top = stages
        low.keeps_sg_prediction = keep
        calls = _count_sg_forwards(low)
        x, y = first_batch(data, 32)
        ups = []
        for step in (0, 1):
            (up,) = low.forward(step, x[step::2], y[step::2])
            low.update(step)
            ups.append(up)
        for up in ups:
            (grad,) = top.forward(up.step, up.tensor, up.labels)
            assert grad.kind is Kind.GRAD
            low.on_message(grad)
        results.append(flat_params(stages))
        forwards.append(calls[0])
    assert torch.equal(*results)
    assert forwards == [3, 4]  # kept: 2 updates + step 1 again; not kept: 2 updates + 2 trainings


def test_only_the_oldest_waiting_steps_output_is_kept() -> None:
    # Targets held back two steps (sg.delay): a newer step's output could never serve, since
    # the older steps' targets train the SG first; at most one is kept, and nothing changes.
    results = []
    for keep in (True, False):
        stages, data = stages_for("segments=3", "sg.delay=2")
        for stage in stages[:-1]:
            stage.keeps_sg_prediction = keep
        engine = LocalEngine(stages, delay=2)
        for i, (x, y) in enumerate(zip(*[t.split(32) for t in first_batch(data, 320)], strict=True)):
            engine.train_step(x, y)
            for stage in stages[:-1]:
                assert i < 2 or stage.pending_steps >= 2  # targets are late: steps wait
                assert sum(p.prediction is not None for p in stage._pending.values()) <= 1
        results.append(flat_params(stages))
    assert torch.equal(*results)


def test_an_sg_with_batch_norm_keeps_its_two_forwards() -> None:
    stages, _ = stages_for("segments=2", "sg.kind=mlp")
    assert not stages[0].keeps_sg_prediction  # reuse would move its running statistics once, not twice


def test_async_stage_0_updates_every_step_when_targets_come_between_forward_and_update() -> None:
    # Stage 0 takes the targets that arrived during a step's forward before its update; one
    # of the step itself (a fast top) waits for the update, so no update is lost. Stage 0's
    # simulated work (slow) comes between its send and its update: each step's own target
    # is there when it looks.
    stages, _, _ = run_threaded(load_config(overrides=["segments=2"]), "async", slow={0: 0.02}, steps=20)
    low = stages[0]
    assert low.stats.updates_without_waiting == low.stats.sg_updates == 20
    assert low.stats.dropped_targets == 0 and low.pending_steps == 0
