"""The local engine's semantics: what targets each SG learns from, weight stashing,
stochastic updates, determinism."""

from __future__ import annotations

import copy

import torch
from helpers import first_batch, flat_params, stages_for, train_steps

from dni_dist.core.messages import Kind
from dni_dist.engines.local import LocalEngine

SGD = ("optim.name=sgd", "optim.lr=0.1", "optim.momentum=0")


def test_one_segment_is_plain_backprop_training() -> None:
    stages, data = stages_for("segments=1", "method=backprop", *SGD)
    reference = copy.deepcopy(stages[0].module)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    engine = LocalEngine(stages)
    x, y = first_batch(data)
    for _ in range(3):
        engine.train_step(x, y)
        optimizer.zero_grad()
        data.task.loss(reference(x), y).backward()
        optimizer.step()
    for a, b in zip(stages[0].module.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_true_targets_pass_backprops_gradient_through_stashed_weights() -> None:
    """With K=3, stage 1 updates from its SG before the true gradient arrives; the gradient
    it passes down must still be backprop's for that step (weights used in the forward)."""
    stages, data = stages_for("segments=3", "sg.target=true", *SGD)
    x, y = first_batch(data)
    mods = [copy.deepcopy(s.module) for s in stages]
    h0 = mods[0](x).detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(data.task.loss(mods[2](mods[1](h0)), y), h0)

    (a0,) = stages[0].forward(0, x, y)
    stages[0].update(0)
    (a1,) = stages[1].forward(0, a0.tensor, y)
    with torch.no_grad():  # make stage 1's SG non-zero so its own update really moves it
        stages[1].boundary.sg.bias.fill_(1.0)
    assert stages[1].update(0) == []  # true mode sends no bootstrap target
    assert not torch.allclose(
        flat_params(stages[1:2])[:100], torch.cat([p.flatten() for p in mods[1].parameters()])[:100]
    )
    (grad_for_1,) = stages[2].forward(0, a1.tensor, y)
    (down,) = stages[1].on_message(grad_for_1)
    assert down.kind is Kind.GRAD and down.dst == 0
    torch.testing.assert_close(down.tensor, expected)


def test_bootstrap_target_is_the_gradient_of_the_stage_above_under_its_own_sg() -> None:
    stages, data = stages_for("segments=3", "sg.target=bootstrap", *SGD)
    x, y = first_batch(data)
    with torch.no_grad():
        stages[1].boundary.sg.bias.normal_()
    sg1 = copy.deepcopy(stages[1].boundary.sg)
    mod1 = copy.deepcopy(stages[1].module)
    (a0,) = stages[0].forward(0, x, y)
    h0 = a0.tensor.clone().requires_grad_(True)
    h1 = mod1(h0)
    (expected,) = torch.autograd.grad(h1, h0, sg1(h1.detach(), data.task.context(y)) / len(x))
    stages[1].forward(0, a0.tensor, y)
    (boot,) = stages[1].update(0)
    assert boot.kind is Kind.BOOTSTRAP and boot.dst == 0
    torch.testing.assert_close(boot.tensor, expected)


def test_target_modes_agree_for_two_segments_and_differ_for_three() -> None:
    def params_after(mode: str, segments: int) -> torch.Tensor:
        stages, data = stages_for(f"segments={segments}", f"sg.target={mode}")
        train_steps(LocalEngine(stages), data, steps=5)
        return flat_params(stages)

    torch.testing.assert_close(params_after("true", 2), params_after("bootstrap", 2))
    assert not torch.allclose(params_after("true", 3), params_after("bootstrap", 3))
    assert not torch.allclose(params_after("lambda", 3), params_after("bootstrap", 3))
    assert not torch.allclose(params_after("lambda", 3), params_after("true", 3))


def test_lambda_zero_and_one_are_bootstrap_and_true() -> None:
    def params_after(*overrides: str) -> torch.Tensor:
        stages, data = stages_for("segments=3", *overrides)
        train_steps(LocalEngine(stages), data, steps=4)
        return flat_params(stages)

    torch.testing.assert_close(params_after("sg.target=lambda", "sg.target_lambda=1.0"), params_after("sg.target=true"))
    torch.testing.assert_close(
        params_after("sg.target=lambda", "sg.target_lambda=0.0"), params_after("sg.target=bootstrap")
    )


def test_stochastic_updates_skip_with_probability_one_minus_p() -> None:
    stages, data = stages_for("update_prob=0.0")
    weights = [p.detach().clone() for p in stages[0].module.parameters()]
    sg_weights = [p.detach().clone() for p in stages[0].boundary.parameters()]
    train_steps(LocalEngine(stages), data, steps=5)
    assert stages[0].stats.updates == 0 and stages[0].stats.skipped_updates == 5
    # the network's weights are untouched; the SG still learns
    assert all(torch.equal(a, b) for a, b in zip(weights, stages[0].module.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(sg_weights, stages[0].boundary.parameters(), strict=True))
    assert stages[0].stats.sg_updates == 5
    stages, data = stages_for("update_prob=0.5")
    train_steps(LocalEngine(stages), data, steps=40)
    assert 8 <= stages[0].stats.updates <= 32


def test_same_seed_same_parameters_other_seed_other_parameters() -> None:
    def run(seed: int) -> torch.Tensor:
        stages, data = stages_for(f"seed={seed}", "segments=3")
        train_steps(LocalEngine(stages), data, steps=6)
        return flat_params(stages)

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_sg_learns_the_true_gradient() -> None:
    stages, data = stages_for("segments=2", "epochs=3")
    engine = LocalEngine(stages)
    for _ in range(3):
        train_steps(engine, data, steps=40)
    assert stages[0].stats.sg_cosine_sum / stages[0].stats.sg_updates > 0.2
    assert stages[0].stats.staleness_sum == 0  # lockstep: every target is for the latest step
