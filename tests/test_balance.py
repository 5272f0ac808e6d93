"""Cuts balanced by FLOPs per step, each stage's SG boundary included (balance=cost)."""

from __future__ import annotations

import pytest
import torch

from dni_dist.builder import build_stages, load_data, make_boundary, plan_model
from dni_dist.config import TrainConfig, load_config
from dni_dist.core.cost import StepCosts, step_costs
from dni_dist.core.partition import balanced_cuts, segment_loads
from dni_dist.errors import ConfigError


def _cuts(*settings: str) -> list[int]:
    config = load_config(overrides=list(settings))
    data = load_data(config)
    blocks = [len(segment) for segment in plan_model(config, data.input_shape, data.task).segments]
    return [sum(blocks[: i + 1]) for i in range(len(blocks) - 1)]


def _costs(config: TrainConfig) -> StepCosts:
    data = load_data(config)
    model = [block for segment in plan_model(config, data.input_shape, data.task).segments for block in segment]
    return step_costs(
        model,
        data.input_shape,
        config.data.batch_size,
        data.task,
        lambda k, shape: make_boundary(config, data.task, k, shape),
        config.sg.refresh,
    )


def test_equal_costs_give_the_parameter_cuts() -> None:
    for weights, segments in (([10, 10, 10, 10], 2), ([1, 100, 1, 1], 2), ([5, 5, 5, 5, 5, 5], 3), ([3, 3], 1)):
        n = len(weights)
        assert balanced_cuts(weights, segments, after=[0] * n, below=weights) == balanced_cuts(weights, segments)


def test_a_boundary_cost_moves_the_cut_down() -> None:
    # Four blocks of equal cost: without a boundary the halves are equal; a boundary as dear as
    # a block and a bit makes the stage that carries it take fewer blocks.
    assert balanced_cuts([6, 6, 6, 6], 2) == [2]
    assert balanced_cuts([6, 6, 6, 6], 2, after=[8, 8, 8, 0]) == [1]
    # The top pays no boundary; a refreshing stage pays its blocks' forward once more.
    assert segment_loads([6, 6, 6, 6], [1], after=[8, 8, 8, 0], below=[8, 8, 8, 8]) == [16, 18]
    with pytest.raises(ConfigError, match="no split of the 3 blocks"):
        balanced_cuts([1, 1, 1], 2, after=[float("inf"), float("inf"), 0])


def test_the_sg_cost_moves_the_default_digits_cut() -> None:
    """At K=2 the linear SG at width 256 costs more than a hidden layer: stage 0 keeps one block.
    Backprop's boundary costs nothing, so its cost cuts are the parameter cuts."""
    assert _cuts("segments=2", "balance=params") == [2]
    assert _cuts("segments=2") == [1]
    assert _cuts("segments=2", "method=backprop") == [2]


def test_cost_cuts_are_deterministic_and_leave_the_random_stream_alone() -> None:
    config = load_config(overrides=["segments=3"])
    assert _costs(config) == _costs(config)
    assert _cuts("segments=3") == _cuts("segments=3")
    # Counting builds SGs; the stages built after the plan must not notice.
    draws = []
    for balance in ("cost", "params"):
        config = load_config(overrides=["segments=3", f"balance={balance}"])
        data = load_data(config)
        plan = plan_model(config, data.input_shape, data.task)
        weights = torch.cat([p.flatten() for segment in plan.segments for p in segment.parameters()])
        draws.append((weights, torch.rand(3)))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])


def test_params_reproduces_the_old_cuts_and_explicit_cuts_win() -> None:
    assert [_cuts(f"segments={k}", "balance=params") for k in (2, 3, 4)] == [[2], [1, 2], [1, 2, 3]]
    assert _cuts("segments=2", "cuts=[2]") == [2]


def test_cost_balance_avoids_cuts_where_the_sg_cannot_sit() -> None:
    # A conv SG needs a feature map: after the flatten (cut 3 of the cnn) it cannot be built.
    settings = ("model.kind=cnn", "sg.kind=conv", "segments=3")
    assert _cuts(*settings) == [1, 2]
    config = load_config(overrides=[*settings, "balance=params"])
    data = load_data(config)
    with pytest.raises(ConfigError, match="needs a feature map"):
        build_stages(config, data.input_shape, data.task)


def test_bad_balance_names_the_value() -> None:
    with pytest.raises(ConfigError, match=r"^balance='flops' is unknown; use one of cost, params$"):
        load_config(overrides=["balance=flops"])
