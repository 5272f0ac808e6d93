"""Steps in flight: how many stage 0 may keep waiting for SG targets, and what each holds.

Two numbers bound an unlocked pipeline's stage 0. What the pipeline *needs*: enough steps in
flight to cover the round trip of a target back to stage 0 (fewer and stage 0 idles, which
idles everyone above it). What memory *allows*: every waiting step keeps tensors alive.
``in_flight_limit`` takes the smaller; the scale model (``bench/scale_sim.py``) calls the
same function, so its ``dni`` prediction is the runtime's default.

``PendingMeter`` measures what one waiting step holds on the stage's first forward only
(``saved_tensors_hooks`` see every tensor autograd saves), so later steps pay nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dni_dist.core.messages import Message

if TYPE_CHECKING:  # type hints only: stage.py is the module above this one in core
    from dni_dist.core.stage import Stage

AUTO = 0  # dist.max_in_flight / dist.pending_memory: derive the value
# dist.pending_memory=0 on a CPU: stages of a local run share the host's memory.
CPU_PENDING_MEMORY = 1 << 30
# ... on a GPU: half the device. Weights, optimiser state and the step being computed fit in
# the rest with room to spare (about 13 GB at stage 1 of the scale model's K=8 cluster model,
# whose waiting steps hold 6.8 GB each: graph and stashed weights). A quarter would hold
# that stage to 5 waiting steps where it needs about 8 (6.2x one device instead of 7.9x); a
# fixed 1 GiB would strangle any transformer-sized pipeline.
GPU_PENDING_FRACTION = 0.5


def target_hops(num_stages: int, target_mode: str) -> int:
    """Hops between stage 0 and the stage whose message completes stage 0's step: the top for
    true targets (lambda waits for the true part too), stage 1 for bootstrap targets."""
    if num_stages < 2:
        return 0
    return 1 if target_mode == "bootstrap" else num_stages - 1


def auto_in_flight(num_stages: int, target_mode: str) -> int:
    """Steps stage 0 needs in flight to never wait for a target, in steady state: d + 1.

    Let P be the pipeline's period (the busiest stage's time per step: forward F, SG update
    U and target handling G, each about one pass through the segment, so about P/3) and
    d = target_hops. Stage 0's step s is done when its target has been handled there. On the
    way up each of the d stages forwards it (F); on the way down each hands the gradient on
    (G, through the stashed weights; a bootstrap target leaves stage 1 right after its
    update). Each arrival may wait behind the task in progress: half a task, P/6, on
    average. So a hop up and back costs about F + G + 2 x P/6 = P, and the round trip,
    stage 0's own forward and target handling included, about (d + 1) P: d + 1 steps keep
    stage 0 feeding one per period. That is K for true and lambda targets (lambda waits for
    the true part too) and 2 for bootstrap targets whatever K; the scale model saturates
    exactly there. The naive count, a period per hop (2K), adds no speed but doubles the
    targets' staleness: a step beyond the need only waits in a queue, and on digits each
    step of target delay beyond 1 costs accuracy (benchmarks/RESULTS.md). Slow links
    lengthen the round trip by 2d latencies, which this does not know: raise it by hand.
    One stage has nothing to wait for: 1.
    """
    return target_hops(num_stages, target_mode) + 1


def steps_within(budget_bytes: int, step_bytes: int, stash_bytes: int = 0, stash_versions: int = 0) -> int:
    """The most waiting steps ``budget_bytes`` holds, at least one. A step holds ``step_bytes``
    if it keeps a weight stash, ``stash_bytes`` less if not (the copies and the graph built on
    them); with ``stash_versions`` N > 0 only the first N waiting steps keep one (core/stage.py),
    so every step beyond them costs only what is left. N = 0: every step keeps one."""
    if not stash_versions or not stash_bytes or budget_bytes < stash_versions * step_bytes:
        return max(1, budget_bytes // step_bytes)
    plain = step_bytes - stash_bytes
    if plain <= 0:  # a step without a stash holds nothing measurable: memory does not bound it
        return _UNBOUNDED
    return min(_UNBOUNDED, stash_versions + (budget_bytes - stash_versions * step_bytes) // plain)


# steps_within's answer when memory sets no bound (above any in-flight limit config allows).
_UNBOUNDED = 1 << 30


def in_flight_limit(
    requested: int,
    num_stages: int,
    target_mode: str,
    budget_bytes: int,
    step_bytes: int | None,
    stash_bytes: int = 0,
    stash_versions: int = 0,
) -> tuple[int, str]:
    """(limit, what set it): ``explicit`` (``requested`` > 0 is taken as given), ``memory``
    (``steps_within`` the budget, at least one) or ``pipeline`` (``auto_in_flight``).
    ``step_bytes`` None: not measured yet (before the first step): the pipeline's need.
    ``stash_bytes``, ``stash_versions``: see ``steps_within`` (a bounded stash lets more
    steps fit)."""
    if requested > 0:
        return requested, "explicit"
    need = auto_in_flight(num_stages, target_mode)
    if step_bytes:
        fit = steps_within(budget_bytes, step_bytes, stash_bytes, stash_versions)
        if fit < need:
            return fit, "memory"
    return need, "pipeline"


def pending_budget(requested: int, device: torch.device) -> int:
    """Bytes a stage's waiting steps may hold: ``requested``, or the default for ``device``."""
    if requested > 0:
        return requested
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * GPU_PENDING_FRACTION)
    return CPU_PENDING_MEMORY


class PendingMeter:
    """What one waiting step holds at a stage (measured once) and the most steps that waited.

    Counted: the tensors autograd saved for the step's forward graph where the stage keeps
    that graph until a target arrives (locked methods; stages that stash weights, whose
    copies the graph saves), plus the input, activation and context kept for the SG, plus
    the bootstrap target a lambda stage holds until the true one comes, plus the SG output
    kept to train the SG on (``Stage.reuse_lag`` > 0). Live parameters and buffers are not
    counted: they exist whatever the pipeline's depth.

    ``stash_bytes``: the part of ``step_bytes`` that only a step with a weight stash holds
    (the copies and the graph built on them). The first step always gets a stash, so it is
    measured there; with ``stash_versions`` N > 0 only N waiting steps hold it.
    """

    def __init__(self) -> None:
        self.step_bytes: int | None = None
        self.stash_bytes = 0
        self.stash_versions = 0
        self.peak_steps = 0

    def forward(self, stage: Stage, step: int, x: torch.Tensor, labels: torch.Tensor) -> list[Message]:
        """``stage.forward``; on the first call also measure. Pending steps grow only here."""
        if self.step_bytes is None and not stage.is_top:
            saved: list[torch.Tensor] = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                out = stage.forward(step, x, labels)
            self.step_bytes, self.stash_bytes = _step_bytes(stage, step, saved)
            self.stash_versions = stage.stash_versions
        else:
            out = stage.forward(step, x, labels)
        self.peak_steps = max(self.peak_steps, stage.pending_steps)
        return out

    def steps_within(self, budget_bytes: int) -> int:
        """The most waiting steps ``budget_bytes`` holds here (measured first)."""
        assert self.step_bytes, "measured on the first step"
        return steps_within(budget_bytes, self.step_bytes, self.stash_bytes, self.stash_versions)

    def summary(self) -> dict[str, int | None]:
        step = self.step_bytes or 0
        stashed = min(self.peak_steps, self.stash_versions) if self.stash_versions else self.peak_steps
        return {
            "pending_step_bytes": step,
            "pending_stash_bytes": self.stash_bytes,
            "peak_pending_steps": self.peak_steps,
            "peak_pending_bytes": (step - self.stash_bytes) * self.peak_steps + self.stash_bytes * stashed,
        }


def _step_bytes(stage: Stage, step: int, saved: list[torch.Tensor]) -> tuple[int, int]:
    """(what pending ``step`` holds, the part of it only a step with a weight stash holds)."""
    kept = stage.pending_tensors(step)
    if not kept:  # not pending (the top; a step evicted at once): it holds nothing
        return 0, 0
    live = {_storage(t) for t in (*stage.module.parameters(), *stage.module.buffers())}
    h_bytes = kept[1].numel() * kept[1].element_size()
    # extra, each shaped like h: a lambda stage's bootstrap target; the SG output kept for
    # the SG's training with sg.reuse_lag (its graph saves h and the context, held anyway)
    extra = h_bytes * ((stage.down_messages_per_step > 1) + (stage.reuse_lag > 0))
    total = _held(kept + (saved if stage.keeps_graph else []), live) + extra
    if not stage.stashes_weights:
        return total, 0
    # A step without a stash keeps input, activation and context only: its graph is freed by
    # its update (sg) or never kept (ddg, fdg); its gradient goes through a recomputed forward.
    return total, total - (_held(kept[:3], live) + extra)


def _held(tensors: list[torch.Tensor], live: set[int]) -> int:
    """Bytes of ``tensors`` not in ``live`` storages, one storage counted once however many
    views of it were saved."""
    held: dict[int, int] = {}
    for t in tensors:
        key = _storage(t)
        if key not in live:
            held[key] = max(held.get(key, 0), t.numel() * t.element_size())
    return sum(held.values())


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()
