"""The lean fused-Adam step (core/fused_adam.py) must be Adam.step, bit for bit, or not run."""

from __future__ import annotations

import copy

import pytest
import torch

from dni_dist.core import fused_adam
from dni_dist.core.numerics import masked_step


def _params(seed: int = 0, device: str = "cpu") -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g).to(device)) for shape in ((17, 5), (5,), (3, 3))]


def _grads(step: int, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(p.device) for p in params]


def _run(make, lean: bool, skips: tuple[bool, ...], drop_second: bool = False, device: str = "cpu"):
    params = _params(device=device)
    optimizer = make(params)
    took = []
    for i, skip in enumerate(skips):
        for j, (p, g) in enumerate(zip(params, _grads(i, params), strict=True)):
            # A parameter without a gradient this step (unused): both paths leave it alone.
            p.grad = None if (drop_second and j == 1 and i % 2) else g
        found_inf = torch.tensor(float(skip), device=device)
        if lean and fused_adam.step(optimizer, found_inf):
            took.append(True)
        else:
            optimizer.found_inf = found_inf
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            took.append(False)
    return params, optimizer, took


OPTIMISERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01, fused=True),
    "adam-decay-maximize": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1, maximize=True, fused=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, fused=True),
    "two-groups": lambda ps: torch.optim.Adam(
        [{"params": ps[:1]}, {"params": ps[1:], "lr": 0.1, "betas": (0.8, 0.9)}], lr=0.01, fused=True
    ),
}


CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("name", sorted(OPTIMISERS))
def test_the_lean_step_is_adams_step_bit_for_bit(name: str, device: str) -> None:
    skips = (False, True, False, False, True, True, False)
    reference, ref_opt, _ = _run(OPTIMISERS[name], lean=False, skips=skips, drop_second=True, device=device)
    lean, lean_opt, took = _run(OPTIMISERS[name], lean=True, skips=skips, drop_second=True, device=device)
    assert took == [False] + [True] * (len(skips) - 1)  # the first step creates the state
    for a, b in zip(reference, lean, strict=True):
        assert torch.equal(a.detach(), b.detach())
        assert a.grad is None and b.grad is None
    ref_state, lean_state = ref_opt.state_dict()["state"], lean_opt.state_dict()["state"]
    for key in ref_state:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ref_state[key][field], lean_state[key][field]), (key, field)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.Adam(ps, lr=0.01),  # not fused
        lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True, fused=True),
        lambda ps: torch.optim.Adam(ps, lr=torch.tensor(0.01), fused=True),
        lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, fused=True),
        lambda ps: type("MyAdam", (torch.optim.Adam,), {})(ps, lr=0.01, fused=True),
    ],
    ids=["foreach", "amsgrad", "tensor-lr", "sgd", "subclass"],
)
def test_optimisers_it_cannot_match_are_left_to_their_own_step(make) -> None:
    params = _params()
    optimizer = make(params)
    for p, g in zip(params, _grads(0, params), strict=True):
        p.grad = g
    optimizer.step()  # state exists
    before = copy.deepcopy([p.detach() for p in params])
    for p, g in zip(params, _grads(1, params), strict=True):
        p.grad = g
    assert not fused_adam.step(optimizer, torch.tensor(0.0))
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params, strict=True))  # nothing changed
    assert all(p.grad is not None for p in params)


def test_a_step_hook_sends_the_step_through_adam() -> None:
    params = _params()
    optimizer = torch.optim.Adam(params, lr=0.01, fused=True)
    calls = []
    optimizer.register_step_post_hook(lambda *_: calls.append(1))
    for i in range(3):
        for p, g in zip(params, _grads(i, params), strict=True):
            p.grad = g
        masked_step(optimizer, torch.tensor(True))
        assert all(p.grad is None for p in params)
    assert len(calls) == 3


def test_a_checkpointed_optimiser_steps_the_lean_way_after_loading() -> None:
    params, optimizer, _ = _run(OPTIMISERS["adam"], lean=True, skips=(False, False))
    state = copy.deepcopy(optimizer.state_dict())
    fresh = _params(seed=1)
    for p, q in zip(fresh, params, strict=True):
        p.data.copy_(q.detach())
    loaded = torch.optim.Adam(fresh, lr=0.01, fused=True)
    loaded.load_state_dict(state)
    for p, g in zip(fresh, _grads(5, fresh), strict=True):
        p.grad = g
    assert fused_adam.step(loaded, torch.tensor(0.0))
    for p, g in zip(params, _grads(5, params), strict=True):
        p.grad = g
    optimizer.found_inf = torch.tensor(0.0)
    optimizer.step()
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(params, fresh, strict=True))
