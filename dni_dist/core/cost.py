"""The cost of one stage's step in FLOPs, counted from shapes, for balancing cuts.

Every Ray actor plans the model itself, so the plan must come out the same in every process:
wall-clock timing would not, FLOPs counted by ``FlopCounterMode`` do. Everything runs on the
meta device: no memory, no arithmetic, no random numbers drawn, and the real modules (their
batch-norm statistics) are left untouched. Only matrix products and convolutions are counted,
which is where a step's time goes.

A stage below a cut pays, besides its blocks' forward and backward, its boundary at that cut:
what ``Stage`` runs per step (core/stage.py). For a learned SG that is the SG's forward for the
signal, its training forward and backward, and, for ``sg`` with refresh on, what a late target
triggers (core/staleness.py): the SG's prediction on the step's own h and the segment's forward
again. In a deep pipeline targets are late, so the refresh is paid on every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dni_dist.core.methods import Boundary, SyntheticBoundary
from dni_dist.core.tasks import Task
from dni_dist.errors import ConfigError

Shape = tuple[int, ...]
# Builds the boundary a cut with activations of this shape gets (the same one the stage gets).
BoundaryFactory = Callable[[int, Shape], Boundary]


@dataclass(frozen=True)
class StepCosts:
    """FLOPs per step: ``top[b]`` block b in the top segment, ``below[b]`` in a segment under a
    cut, ``after[b]`` the boundary of a cut right after block b (inf where none can be built)."""

    top: list[int]
    below: list[int]
    after: list[float]


def _stand_in_state(module: nn.Module, device: str) -> dict[str, torch.Tensor]:
    """Stand-ins for a module's parameters and buffers, so a pass on them touches nothing real:
    on meta (nothing allocated), or zeros on the CPU for a model the meta device cannot run."""
    like = torch.empty_like if device == "meta" else torch.zeros_like
    state = {name: like(p, device=device).requires_grad_(p.requires_grad) for name, p in module.named_parameters()}
    state.update({name: b.to(device, copy=True) for name, b in module.named_buffers()})
    return state


class _TotalOnly:
    """Stands in for FlopCounterMode's module tracker: only the total is wanted here, and the
    tracker's autograd hooks break ``torch.autograd.grad`` w.r.t. a leaf created inside the
    mode, which is what sg-prop's signal takes."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _TotalOnly:
        return self

    def __exit__(self, *args: object) -> None:
        return None


def _counter() -> FlopCounterMode:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _TotalOnly()
    return counter


def _flops(run: Callable[[], object]) -> int:
    with _counter() as counter:
        run()
    return int(counter.get_total_flops())


def block_costs(
    blocks: Sequence[nn.Module], input_shape: Shape, batch: int, device: str = "meta"
) -> tuple[list[int], list[int], list[Shape]]:
    """(forward FLOPs, backward FLOPs, output shape) of each block on a batch of ``batch``,
    run on ``device`` (meta; the CPU, computing for real, for a model meta cannot run).

    Block 0 reads data, so its backward computes no input gradient; every other block's does
    (its stage sends it down, or it is inside a segment)."""
    forwards, backwards, shapes = [], [], []
    x = torch.zeros(batch, *input_shape, device=device)
    for b, block in enumerate(blocks):
        forward, backward, x = _block_cost(block, x.detach().requires_grad_(b > 0), device)
        forwards.append(forward)
        backwards.append(backward)
        shapes.append(tuple(x.shape[1:]))
    return forwards, backwards, shapes


def _block_cost(block: nn.Module, x: torch.Tensor, device: str) -> tuple[int, int, torch.Tensor]:
    """(forward FLOPs, backward FLOPs, output) of one block; the input gradient is counted
    if ``x`` requires it."""
    state = _stand_in_state(block, device)
    with _counter() as counter:
        h = torch.func.functional_call(block, state, (x,))
    forward = int(counter.get_total_flops())
    wrt = [t for t in state.values() if t.requires_grad] + ([x] if x.requires_grad else [])
    if not (h.requires_grad and wrt):  # e.g. a parameter-free first block: no backward runs
        return forward, 0, h
    with _counter() as counter:
        torch.autograd.grad(h, wrt, torch.ones_like(h), allow_unused=True)
    return forward, int(counter.get_total_flops()), h


def refreshes(boundary: Boundary, refresh: bool) -> bool:
    """Does the stage recompute h for late targets? Only an unlocked learned SG (Stage._late)."""
    return refresh and isinstance(boundary, SyntheticBoundary) and not boundary.update_locked


def boundary_cost(boundary: Boundary, shape: Shape, batch: int, task: Task, refresh: bool) -> int:
    """FLOPs of what a stage does at its boundary per step, besides its segment's own passes."""
    h = torch.zeros(batch, *shape, device="meta")
    context = task.context(task.blank_labels(batch, device="meta"))
    # What arrives from above: the output error for direct methods (DFA, Kickback), else dL/dh.
    error = torch.zeros(batch, *task.output_shape, device="meta")
    received = error if boundary.direct_error else torch.zeros_like(h)
    # The signal: the SG's output (sg), plus its gradient w.r.t. h (sg-prop), or a fixed SG's.
    total = _flops(lambda: boundary.signal(h, context, received))
    if isinstance(boundary, SyntheticBoundary):

        def train() -> None:
            with torch.enable_grad():
                loss, _ = boundary.sg_loss(h, context, torch.zeros_like(h))
                loss.backward()

        total += _flops(train)
        if refreshes(boundary, refresh):  # the prediction on the step's own h that a refresh adds
            total += _flops(lambda: boundary.predict(h, context))
    return total


def step_costs(
    blocks: Sequence[nn.Module],
    input_shape: Shape,
    batch: int,
    task: Task,
    make_boundary: BoundaryFactory,
    refresh: bool,
    device: str = "meta",
) -> StepCosts:
    """The costs ``partition.balanced_cuts`` balances, for every place a cut may fall.

    ``make_boundary(k, shape)`` builds the boundary at cut k+1 (after block k). A cut where it
    raises ConfigError (say a conv SG after a flatten) costs inf: balancing avoids it. The
    blocks run on ``device``; the boundaries (dni_dist's own) always on meta."""
    forwards, backwards, shapes = block_costs(blocks, input_shape, batch, device)
    top = [f + b for f, b in zip(forwards, backwards, strict=True)]
    after: list[float] = []
    refreshing = False
    with torch.device("meta"):
        # After the last block too: an explicit cut there puts the SG between output and loss.
        for k, shape in enumerate(shapes):
            try:
                boundary = make_boundary(k, shape)
            except ConfigError:
                after.append(math.inf)
                continue
            refreshing = refreshing or refreshes(boundary, refresh)
            after.append(boundary_cost(boundary, shape, batch, task, refresh))
    # A refreshing stage runs its segment's forward once more per late target.
    below = [t + f for t, f in zip(top, forwards, strict=True)] if refreshing else list(top)
    return StepCosts(top, below, after)
