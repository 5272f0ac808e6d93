"""Pipelined backprop (GPipe) in our stage loop: ``dist.micro_batches=M`` groups M steps
into one mini-batch, so the result is backprop's on the concatenated batch."""

from __future__ import annotations

import pytest
import torch
from conftest import config
from helpers import flat_params, local_params
from threaded import run_threaded
from torch import nn

from dni_dist.builder import build_stages, load_data, make_optimizer, plan_model
from dni_dist.data import batches
from dni_dist.errors import ConfigError

# Equal gradients up to round-off: plain SGD keeps it round-off (Adam divides by the
# gradients' scale, so near-zero gradients turn round-off into visible differences).
SGD = ("optim.name=sgd", "optim.lr=0.05")


def _reference(overrides: tuple[str, ...], m: int, epochs: int) -> torch.Tensor:
    """Single-process backprop on the concatenation of each group of m micro-batches."""
    cfg = config(*overrides)
    data = load_data(cfg)
    model = nn.Sequential(*plan_model(cfg, data.input_shape, data.task).segments)
    optimizer = make_optimizer(list(model.parameters()), cfg.optim)
    micro = [b for epoch in range(epochs) for b in batches(data.x_train, data.y_train, 64, cfg.seed, epoch)]
    model.train()
    for g in range(len(micro) // m):  # a trailing partial group is accumulated, never applied
        group = micro[g * m : (g + 1) * m]
        x = torch.cat([x for x, _ in group])
        y = torch.cat([y for _, y in group])
        optimizer.zero_grad()
        data.task.loss(model(x), y).backward()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize(
    "overrides",
    [("method=backprop", "segments=3", *SGD), ("method=fa", "segments=2", *SGD)],
    ids=["backprop", "fa"],
)
def test_pipelined_loop_equals_backprop_on_the_concatenated_batch(overrides: tuple[str, ...]) -> None:
    m = 4
    stages, reports, data = run_threaded(config(*overrides, f"dist.micro_batches={m}"), "async", epochs=2)
    want = _reference(overrides, m, epochs=2)
    torch.testing.assert_close(flat_params(stages), want, rtol=1e-4, atol=1e-5)
    steps = 2 * (len(data.x_train) // 64)
    for stage in stages:
        assert stage.stats.steps == steps and stage.stats.updates == steps // m
        assert stage.pending_steps == 0
    # Pipelined for real: stage 0 had a whole group in flight, and never more.
    assert max(r.max_pending for r in reports[0]) == m


def test_the_local_engine_with_micro_batches_is_the_same_reference() -> None:
    overrides = ("method=backprop", "segments=2", "dist.micro_batches=3", *SGD)
    torch.testing.assert_close(
        local_params(overrides, epochs=1), _reference(overrides, 3, epochs=1), rtol=1e-4, atol=1e-5
    )


def test_direct_errors_with_micro_batches_match_the_local_engine() -> None:
    # DFA: stage 0 gets its errors straight from the top, so it can feed the next group
    # before stage 1 has updated; stage 1 must hold those inputs back.
    overrides = ("method=dfa", "segments=3", "dist.micro_batches=2")
    stages, _, _ = run_threaded(config(*overrides), "async", epochs=1)
    torch.testing.assert_close(flat_params(stages), local_params(overrides, epochs=1), rtol=0, atol=0)


def test_one_micro_batch_changes_nothing() -> None:
    overrides = ("method=backprop", "segments=3")
    stages, reports, _ = run_threaded(config(*overrides, "dist.micro_batches=1"), "async", epochs=1)
    torch.testing.assert_close(flat_params(stages), local_params(overrides, epochs=1), rtol=0, atol=0)
    assert max(r.max_pending for r in reports[0]) == 1  # naive model parallelism: one step at a time
    assert stages[0].stats.updates == stages[0].stats.steps


def test_micro_batches_are_refused_for_unlocked_sg() -> None:
    cfg = config("method=sg", "dist.micro_batches=4")
    data = load_data(cfg)
    with pytest.raises(ConfigError, match=r"dist\.micro_batches=4"):
        build_stages(cfg, data.input_shape, data.task)
