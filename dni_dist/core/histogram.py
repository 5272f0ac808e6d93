"""A fixed-bucket histogram of plain numbers: cheap to update on the hot path, picklable,
and free of any metrics library (the Prometheus side reads it, the stage only counts)."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

# Compute seconds of one step at one stage: sub-millisecond MLP segments up to GPU-less convnets.
STEP_SECONDS_BOUNDS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Steps between a step's forward pass and the SG target that trains on it (max_in_flight is small).
STALENESS_BOUNDS: tuple[float, ...] = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


@dataclass
class Histogram:
    """Counts per bucket ``value <= bounds[i]`` (first match) plus one overflow bucket."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"histogram bounds must increase strictly: {self.bounds}")
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[int]:
        """Observations <= each bound, then the total (Prometheus' ``le`` buckets, +Inf last).

        Safe to call from another thread while ``observe`` runs: the copy is taken first, so
        the buckets are always non-decreasing even if a concurrent update is half-applied.
        """
        counts = list(self.counts)
        out, running = [], 0
        for c in counts:
            running += c
            out.append(running)
        return out
