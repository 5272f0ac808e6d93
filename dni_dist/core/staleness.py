"""Keeping synthetic-gradient training sound when its targets arrive late.

In a pipeline of K stages the target for step s reaches stage 0 several steps after its
forward pass. Measured on digits (benchmarks/RESULTS.md, "Late SG targets"), a plain SG
collapses to chance from a delay of 8 steps: the SG learns from (h, target) pairs whose h
the segment no longer produces, the segment follows the SG, and each moves the other's
target. While targets are late (a running mean of their staleness of ``LATE_AFTER`` steps
or more; below that all three are idle), three measures hold it off:

1. **Refresh** (the one that carries most of the gain): the SG is trained on h recomputed
   from the step's stored input x with the segment's *current* weights, not on the h of
   the step. The SG then learns about the activations the segment produces now, which is
   where it will be queried. Costs one forward of the segment (no graph) per target; no
   memory, since the stage keeps x anyway.
2. **Reliability gate**: the stage knows how good its SG is, because the true targets do
   arrive. It keeps a running mean of r = max(0, 1 - |SG - t|^2 / |t|^2) over arrived
   targets (the SG's prediction on the stored h, before the SG learns from it) and scales
   the SG-driven update of the segment by r: a poor SG moves the segment less than Adam's
   unit-size step would.
3. **Delay-aware learning rate**: the segment's learning rate is divided by
   1 + sqrt(mean staleness) / ``delay_lr``, as delayed-gradient methods do.

The running mean of r is a tensor on the stage's device, so none of this reads back to the
host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# Targets this many steps late on average, or more, are late: below it every measure is
# idle (lockstep delivers at 0; Ray on digits runs at about 0.8 at K=2 and 2.4 at K=4).
# Measured (RESULTS.md, "Late SG targets"): on the local engine at a delay of exactly 2 the
# measures cost under a point; from 3 they pay; on Ray at K=4 (2.4 steps) switching on at 2
# made the end accuracy steadier than waiting for 3.
LATE_AFTER = 2.0
GATES: tuple[str, ...] = ("reliability", "none")
# Weight of the past in the running means (reliability, staleness): about 10 targets.
_EMA = 0.9


@dataclass(frozen=True)
class StalenessPolicy:
    """How a stage with a learned, unlocked SG treats late targets (``sg.*`` in the config)."""

    refresh: bool = True
    gate: str = "reliability"
    delay_lr: float = 1.0  # 0 = the segment's learning rate does not depend on staleness
    # The SG's output made for a step's update also trains the SG on the step's target if
    # the SG took at most this many optimiser steps in between (one SG forward a step
    # instead of two). 0: only if it took none, the same numbers as a second forward. Above
    # 0 the SG learns from a gradient up to that many of its steps old (the DNI paper's
    # form: an SG trains on the prediction it made), which costs accuracy on some cuts
    # (benchmarks/RESULTS.md, "Issue 14, sixth round"). Only SGs whose kept outputs can
    # still train them (SyntheticGradient.fits_kept_outputs) go above 0.
    reuse_lag: int = 0

    def __post_init__(self) -> None:
        if self.gate not in GATES:
            raise ValueError(f"gate={self.gate!r} is unknown; use one of {', '.join(GATES)}")
        if self.reuse_lag < 0:
            raise ValueError(f"reuse_lag={self.reuse_lag} must be >= 0")
        if self.delay_lr < 0 or not math.isfinite(self.delay_lr):
            raise ValueError(f"delay_lr={self.delay_lr} must be a finite number >= 0")


@torch.no_grad()
def agreement(prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine, |p - t|^2 / |t|^2) of an SG's prediction p and its target t, both 0-dim on
    their device. A stage needs both for every target (the cosine for its metrics, the error
    for the reliability gate); three dot products give every sum they are made of (30 us
    against 47 us for the two computed apart, 64 x 256 values on one CPU core). Expanding
    |p - t|^2 loses about 1e-7 of |t|^2 to rounding, nothing to a running mean."""
    p, t = prediction.flatten(), target.flatten()
    pp, pt, tt = torch.dot(p, p), torch.dot(p, t), torch.dot(t, t)
    error = (pp - 2 * pt + tt).clamp_min(0.0) / tt.clamp_min(1e-12)
    cosine = pt / (pp * tt).sqrt().clamp_min(1e-12)
    return cosine, error


class StalenessControl:
    """The running state behind a ``StalenessPolicy`` for one stage."""

    def __init__(self, policy: StalenessPolicy, optimizer: torch.optim.Optimizer | None) -> None:
        self.policy = policy
        self.optimizer = optimizer
        self.base_lrs = [group["lr"] for group in optimizer.param_groups] if optimizer is not None else []
        self.reliability: torch.Tensor | None = None  # running mean of r, on the SG's device
        self.staleness = 0.0  # running mean of target staleness, in steps

    @property
    def late(self) -> bool:
        """Are targets late, by the running mean of their staleness?"""
        return self.staleness >= LATE_AFTER

    def refresh(self) -> bool:
        """Should the SG learn from an h recomputed with the current weights?"""
        return self.policy.refresh and self.late

    def gate(self) -> torch.Tensor | None:
        """The factor on the SG-driven update, or None while targets are fresh."""
        if self.policy.gate == "none" or not self.late or self.reliability is None:
            return None
        return self.reliability

    @torch.no_grad()
    def observe(self, error: torch.Tensor, staleness: int, ok: torch.Tensor | None = None) -> None:
        """One arrived target: the relative squared error of the SG's prediction for it
        (``agreement``) and how late it came. ``ok`` false (a skipped, non-finite step, known
        only on the device): the reliability keeps its value (a first one starts at 0,
        trusting the SG not at all)."""
        r = (1.0 - error).clamp_min(0.0)
        if self.reliability is None:  # the first target: the means start at its values
            self.reliability = r if ok is None else torch.where(ok, r, 0.0)
            self.staleness = float(staleness)
        else:
            updated = _EMA * self.reliability + (1 - _EMA) * r
            self.reliability = updated if ok is None else torch.where(ok, updated, self.reliability)
            self.staleness = _EMA * self.staleness + (1 - _EMA) * staleness
        if self.policy.delay_lr and self.optimizer is not None:
            factor = 1.0 / (1.0 + math.sqrt(self.staleness) / self.policy.delay_lr) if self.late else 1.0
            for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                group["lr"] = base * factor

    def state_dict(self) -> dict[str, Any]:
        return {"reliability": self.reliability, "staleness": self.staleness}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reliability = state["reliability"]
        self.staleness = state["staleness"]
