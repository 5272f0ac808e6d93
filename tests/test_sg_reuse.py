"""An SG's output made for a step's update also trains the SG on that step's target: when
the SG has not learned in between, the same numbers as a second forward; with
sg.reuse_lag=L also after up to L SG steps, as the gradient of the loss at the SG's weights
of the update. One SG forward a step instead of two."""

from __future__ import annotations

import pytest
import torch
from helpers import first_batch, flat_params, stages_for, train_steps
from threaded import run_threaded

from dni_dist.config import load_config
from dni_dist.core.messages import Kind
from dni_dist.core.methods import SyntheticBoundary
from dni_dist.core.synthetic import SGSpec, build_sg
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


def _two_steps_in_flight(low, top, data, on_grad=None) -> None:
    """Stage 0 forwards and updates steps 0 and 1 before either target comes back."""
    x, y = first_batch(data, 32)
    ups = []
    for step in (0, 1):
        (up,) = low.forward(step, x[step::2], y[step::2])
        low.update(step)
        ups.append(up)
    for up in ups:
        (grad,) = top.forward(up.step, up.tensor, up.labels)
        assert grad.kind is Kind.GRAD
        if on_grad is not None:
            on_grad(grad)
        low.on_message(grad)


def test_by_default_an_sg_that_learned_after_the_update_runs_again() -> None:
    """Two steps in flight: step 1's update used the SG before it learned from step 0's
    target, so its training must not reuse that output; the result is a second forward's."""
    results, forwards = [], []
    for keep in (True, False):
        stages, data = stages_for("segments=2")
        low, top = stages
        low.keeps_sg_prediction = keep
        calls = _count_sg_forwards(low)
        _two_steps_in_flight(low, top, data)
        results.append(flat_params(stages))
        forwards.append(calls[0])
    assert torch.equal(*results)
    assert forwards == [3, 4]  # kept: 2 updates + step 1 again; not kept: 2 updates + 2 trainings


def test_with_a_reuse_lag_the_sg_learns_from_the_output_its_update_used() -> None:
    """sg.reuse_lag=1: step 1's target trains the SG through the output step 1's update used,
    made before the SG learned from step 0's target: the gradient is the fitting loss's at
    those older weights (not at the current ones), and the SG runs once a step."""
    stages, data = stages_for("segments=2", "sg.reuse_lag=1")
    low, top = stages
    assert low.reuse_lag == 1
    sg = low.boundary.sg
    calls = _count_sg_forwards(low)
    grads: dict[str, torch.Tensor] = {}
    for name, p in sg.named_parameters():
        p.register_hook(lambda g, name=name: grads.__setitem__(name, g.clone()))
    before = {n: p.detach().clone() for n, p in sg.named_parameters()}  # what both updates used
    arrived = []  # (target, the step's h and context), as each target comes
    _two_steps_in_flight(
        low,
        top,
        data,
        lambda grad: arrived.append((grad.tensor, low._pending[grad.step].h, low._pending[grad.step].context)),
    )
    assert calls[0] == 2
    target, h, context = arrived[1]
    now = {n: p.detach().clone() for n, p in sg.named_parameters()}  # after learning from both
    for weights, used in ((before, True), (now, False)):
        weights = {n: w.requires_grad_(True) for n, w in weights.items()}
        loss, _ = SyntheticBoundary.fit_loss(torch.func.functional_call(sg, weights, (h.detach(), context)), target)
        expected = torch.autograd.grad(loss, list(weights.values()))
        assert all(torch.allclose(grads[n], e, atol=1e-7) for n, e in zip(weights, expected, strict=True)) == used


def _delayed_run(*overrides: str, steps: int = 10):
    """K=3, targets held back two steps (sg.delay): yields after each step."""
    stages, data = stages_for("segments=3", "sg.delay=2", *overrides)
    engine = LocalEngine(stages, delay=2)
    for i, (x, y) in enumerate(zip(*[t.split(32) for t in first_batch(data, 32 * steps)], strict=True)):
        engine.train_step(x, y)
        yield i, stages


def test_by_default_only_the_oldest_waiting_steps_output_is_kept() -> None:
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


@pytest.mark.parametrize(("lag", "forwards"), [(2, 9), (1, 15)])
def test_the_oldest_lag_plus_one_waiting_steps_keep_their_outputs(lag: int, forwards: int) -> None:
    # Targets two steps late: from step 2 on, two SG steps come between a step's update and
    # its training. Counted from step 1 on: with a lag of 2 every output serves and the SG
    # runs once a step (steps 1-9's updates); with 1, only steps 0 and 1's outputs serve, the
    # other 6 trainings (steps 2-7) run the SG again, and at most two are kept meanwhile.
    counted = None
    for i, stages in _delayed_run("sg.refresh=false", f"sg.reuse_lag={lag}"):  # a refresh recomputes h
        if counted is None:
            counted = [_count_sg_forwards(s) for s in stages[:-1]]  # from step 1 on
        for stage in stages[:-1]:
            assert i < 2 or stage.pending_steps >= 2
            kept = [p.prediction is not None for p in stage._pending.values()]
            assert sum(kept) <= lag + 1 and (lag < 2 or all(kept))
    assert [c[0] for c in counted] == [forwards, forwards]


def test_an_sg_whose_kept_output_cannot_train_it_ignores_the_lag() -> None:
    # Low rank: the backward pass of U needs V, which the SG's steps changed in place.
    for _, stages in _delayed_run("sg.kind=lowrank", "sg.reuse_lag=2"):
        for stage in stages[:-1]:
            assert stage.keeps_sg_prediction and stage.reuse_lag == 0
            assert sum(p.prediction is not None for p in stage._pending.values()) <= 1


@pytest.mark.parametrize(
    ("spec", "fits"),
    [
        (SGSpec(), True),
        (SGSpec(conditioned=False, wrapper="sigmoid", scale=0.5), True),
        (SGSpec(kind="mlp", hidden_layers=0), True),
        (SGSpec(kind="lowrank", rank=4), False),
        (SGSpec(kind="mlp", hidden=8, hidden_layers=1), False),  # batch norm, and a second layer
    ],
)
def test_an_sg_says_whether_an_output_made_before_its_steps_still_trains_it(spec: SGSpec, fits: bool) -> None:
    torch.manual_seed(0)
    sg = build_sg(spec, (6,), 3)
    for p in sg.parameters():  # away from the zero start, so every layer carries a gradient
        torch.nn.init.normal_(p, std=0.3)
    h, context, target = torch.randn(5, 6), torch.eye(3)[torch.arange(5) % 3], torch.randn(5, 6)
    old = {n: p.detach().clone().requires_grad_(True) for n, p in sg.named_parameters()}
    kept = sg(h, context)
    optimizer = torch.optim.SGD(sg.parameters(), lr=0.1)
    sg(h, context).square().sum().backward()
    optimizer.step()  # the SG learned from another target, in place
    optimizer.zero_grad()
    assert sg.fits_kept_outputs == fits
    try:
        SyntheticBoundary.fit_loss(kept, target)[0].backward()
    except RuntimeError as exc:  # autograd: a weight the backward needs was changed in place
        assert not fits, exc
        return
    loss, _ = SyntheticBoundary.fit_loss(torch.func.functional_call(sg, old, (h, context)), target)
    expected = torch.autograd.grad(loss, list(old.values()))
    same = all(torch.allclose(p.grad, e, atol=1e-6) for p, e in zip(sg.parameters(), expected, strict=True))
    assert same and fits  # a batch-norm SG would train, but its forward moved the statistics


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
