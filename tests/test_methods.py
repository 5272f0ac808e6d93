"""Each boundary method hands the lower part exactly its classic rule (the paper's Table 1),
computed here independently of the method classes."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import first_batch, stages_for
from torch import nn

from dni_dist.core.feedback import FALinear
from dni_dist.core.messages import Kind
from dni_dist.core.methods import METHODS
from dni_dist.core.stage import Stage

SGD = ("optim.name=sgd", "optim.lr=0.1", "optim.momentum=0")


def _signal_and_grads(stages: list[Stage], x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run one lockstep step by hand; return the signal stage 0 applied and its param deltas."""
    bottom, top = stages
    before = [p.detach().clone() for p in bottom.module.parameters()]
    captured = {}
    original = bottom.boundary.signal

    def spy(h: torch.Tensor, context: torch.Tensor, received: torch.Tensor | None) -> torch.Tensor:
        captured["signal"] = original(h, context, received)
        captured["h"] = h
        return captured["signal"]

    bottom.boundary.signal = spy
    (act,) = bottom.forward(0, x, y)
    bottom.update(0)
    for msg in top.forward(0, act.tensor, y):
        bottom.on_message(msg)
    deltas = [b - p.detach() for b, p in zip(before, bottom.module.parameters(), strict=True)]
    return captured["signal"], deltas


def _expected_deltas(module: nn.Module, x: torch.Tensor, signal: torch.Tensor, lr: float) -> list[torch.Tensor]:
    """SGD on the lower part driven by ``signal`` at its output, by plain autograd."""
    module = copy.deepcopy(module)
    module.train()
    module(x).backward(signal)
    return [lr * p.grad for p in module.parameters()]


def _snapshot(stages: list[Stage]) -> list[nn.Module]:
    return [copy.deepcopy(s.module) for s in stages]


def test_backprop_signal_is_autograds_dl_dh_and_update_matches() -> None:
    stages, data = stages_for("method=backprop", *SGD)
    x, y = first_batch(data)
    lower, upper = _snapshot(stages)
    h = lower(x).detach().requires_grad_(True)
    loss = data.task.loss(upper(h), y)
    (expected,) = torch.autograd.grad(loss, h)
    signal, deltas = _signal_and_grads(stages, x, y)
    torch.testing.assert_close(signal, expected)
    for got, want in zip(deltas, _expected_deltas(lower, x, expected, 0.1), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method", ["dfa", "kickback"])
def test_direct_methods_send_e_times_fixed_matrix(method: str) -> None:
    stages, data = stages_for(f"method={method}", *SGD)
    x, y = first_batch(data)
    lower, upper = _snapshot(stages)
    out = upper(lower(x).detach()).detach().requires_grad_(True)
    (e,) = torch.autograd.grad(data.task.loss(out, y), out)  # output error e = dL/dp
    if method == "kickback":
        matrix = torch.ones(256, data.task.n_outputs)
    else:
        matrix = stages[0].boundary.projection  # the fixed random R, drawn once at build time
        assert matrix.std() > 0.1
    expected = e @ matrix.T
    signal, deltas = _signal_and_grads(stages, x, y)
    torch.testing.assert_close(signal, expected)
    for got, want in zip(deltas, _expected_deltas(lower, x, expected, 0.1), strict=True):
        torch.testing.assert_close(got, want)


def test_direct_error_goes_one_hop_to_every_lower_stage() -> None:
    stages, data = stages_for("method=dfa", "segments=3")
    x, y = first_batch(data)
    (a0,) = stages[0].forward(0, x, y)
    (a1,) = stages[1].forward(0, a0.tensor, y)
    out = stages[2].forward(0, a1.tensor, y)
    assert [(m.kind, m.dst) for m in out] == [(Kind.ERROR, 0), (Kind.ERROR, 1)]


def test_fa_signal_is_the_random_feedback_chain() -> None:
    stages, data = stages_for("method=fa", *SGD)
    x, y = first_batch(data)
    lower, upper = _snapshot(stages)
    # The upper part is [Linear-ReLU], [Linear]: chain e back through B3 then B2 by hand.
    fa_layers = [m for m in upper.modules() if isinstance(m, FALinear)]
    assert len(fa_layers) == 2
    hidden_layer, out_layer = fa_layers
    h = lower(x).detach()
    a2 = torch.nn.functional.linear(h, hidden_layer.weight, hidden_layer.bias)
    h2 = torch.relu(a2).requires_grad_(True)
    out = torch.nn.functional.linear(h2, out_layer.weight, out_layer.bias)
    (e,) = torch.autograd.grad(data.task.loss(out, y), out)
    delta2 = (e @ out_layer.feedback) * (a2 > 0)
    expected = delta2 @ hidden_layer.feedback
    # FA's feedback is not backprop's transpose: the chain really differs from dL/dh.
    backprop_signal = (e @ out_layer.weight * (a2 > 0)) @ hidden_layer.weight
    assert not torch.allclose(expected, backprop_signal, atol=1e-4)
    signal, deltas = _signal_and_grads(stages, x, y)
    torch.testing.assert_close(signal, expected)
    for got, want in zip(deltas, _expected_deltas(lower, x, expected, 0.1), strict=True):
        torch.testing.assert_close(got, want)


def _randomise(module: nn.Module) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def test_sg_signal_is_sg_output_and_needs_nothing_from_above() -> None:
    stages, data = stages_for("method=sg", *SGD)
    x, y = first_batch(data)
    _randomise(stages[0].boundary)
    sg = copy.deepcopy(stages[0].boundary.sg)
    lower = copy.deepcopy(stages[0].module)
    h = lower(x).detach()
    expected = sg(h, data.task.context(y)).detach() / len(x)
    assert expected.abs().max() > 0
    before = [p.detach().clone() for p in stages[0].module.parameters()]
    stages[0].forward(0, x, y)
    stages[0].update(0)  # no message from above has arrived
    deltas = [b - p.detach() for b, p in zip(before, stages[0].module.parameters(), strict=True)]
    for got, want in zip(deltas, _expected_deltas(lower, x, expected, 0.1), strict=True):
        torch.testing.assert_close(got, want)


def test_sg_prop_signal_adds_alpha_times_dlsg_dh() -> None:
    alpha = 0.7
    stages, data = stages_for("method=sg-prop", f"sg_prop_alpha={alpha}", *SGD)
    x, y = first_batch(data)
    _randomise(stages[0].boundary)
    sg = copy.deepcopy(stages[0].boundary.sg)
    lower, upper = _snapshot(stages)
    h = lower(x).detach().requires_grad_(True)
    (true_grad,) = torch.autograd.grad(data.task.loss(upper(h), y), h)
    h = h.detach()
    batch = len(x)
    ctx = data.task.context(y)
    out = sg(h, ctx).detach()
    # Linear SG, no wrapper: SG(h) = h A^T + y B^T + C, so dL_SG/dh = (SG - B dL/dh) A.
    prop = (out - batch * true_grad) @ sg.core.A.weight
    expected = (out + alpha * prop) / batch
    signal, _ = _signal_and_grads(stages, x, y)
    torch.testing.assert_close(signal, expected)


def test_table_columns() -> None:
    from dni_dist.core.methods import build_boundary
    from dni_dist.core.synthetic import SGSpec, build_sg

    sg = build_sg(SGSpec(), (4,), 3)
    rows = {m: build_boundary(m, sg, (4,), 3, seed=0) for m in METHODS}
    unlocked = {m for m, b in rows.items() if not b.update_locked}
    direct = {m for m, b in rows.items() if b.direct_error}
    not_backwards_locked = {m for m, b in rows.items() if not b.backwards_locked}
    assert unlocked == {"sg"}
    assert direct == {"dfa", "kickback"}
    assert not_backwards_locked == {"sg", "dfa", "kickback"}
    assert {m for m, b in rows.items() if b.runs_ahead} == {"ddg", "fdg"}
