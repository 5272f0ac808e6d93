"""Cut a sequential model into K segments: at explicit cut points, or balanced so that the
heaviest segment is as light as possible, by parameter count or by a cost per step (FLOPs,
core/cost.py) that also charges a stage for the boundary at the cut it ends at."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import nn

from dni_dist.errors import ConfigError

# How cuts are balanced when none are given: FLOPs per step including the SG, or parameters.
BALANCES: tuple[str, ...] = ("cost", "params")


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def balanced_cuts(
    weights: Sequence[float],
    segments: int,
    after: Sequence[float] | None = None,
    below: Sequence[float] | None = None,
) -> list[int]:
    """Cut points (block indices, ascending) minimising the heaviest segment.

    ``weights[b]`` is block b's load in the top segment and ``below[b]`` (default: the same) in
    a segment under a cut; a segment under a cut right after block b also pays ``after[b]`` (its
    boundary; default 0; inf where no cut may fall). The top segment pays no boundary.
    Exact dynamic programme over prefix sums: O(n^2 K) for n blocks, trivial at the model
    sizes a cut list is written for. Ties go to the earliest cut, so the result is stable.
    """
    n = len(weights)
    if not 1 <= segments <= n:
        raise ConfigError(f"segments={segments} is impossible for a model of {n} blocks; use 1..{n}")
    after = [0] * n if after is None else list(after)
    below = list(weights) if below is None else list(below)
    if len(after) != n or len(below) != n:
        raise ValueError(f"after ({len(after)}) and below ({len(below)}) need one entry per block ({n})")
    top, low = _prefix(weights), _prefix(below)
    inf = float("inf")
    # best[k][i]: smallest max-load splitting the first i blocks into k segments, all of them
    # under a cut except, for k == segments, the last (the top).
    best = [[inf] * (n + 1) for _ in range(segments + 1)]
    choice = [[0] * (n + 1) for _ in range(segments + 1)]
    best[0][0] = 0
    for k in range(1, segments + 1):
        ends = [n] if k == segments else range(k, n)
        for i in ends:
            for j in range(k - 1, i):
                own = top[i] - top[j] if k == segments else low[i] - low[j] + after[i - 1]
                load = max(best[k - 1][j], own)
                if load < best[k][i]:
                    best[k][i], choice[k][i] = load, j
    if best[segments][n] == inf:
        raise ConfigError(f"segments={segments}: no split of the {n} blocks puts every cut where a boundary fits")
    cuts, i = [], n
    for k in range(segments, 1, -1):
        i = choice[k][i]
        cuts.append(i)
    return sorted(cuts)


def segment_loads(
    weights: Sequence[float],
    cuts: Sequence[int],
    after: Sequence[float] | None = None,
    below: Sequence[float] | None = None,
) -> list[float]:
    """The load of each segment for given cuts, in ``balanced_cuts``' terms (to report a split)."""
    n = len(weights)
    after = [0] * n if after is None else after
    below = weights if below is None else below
    edges = [0, *cuts, n]
    loads = [sum(below[a:b]) + after[b - 1] for a, b in itertools.pairwise(edges[:-1])]
    return [*loads, sum(weights[edges[-2] :])]


def _prefix(values: Sequence[float]) -> list[float]:
    sums = [0]
    for v in values:
        sums.append(sums[-1] + v)
    return sums


def check_cuts(cuts: Sequence[int], n_blocks: int, segments: int) -> list[int]:
    """Validate explicit cut points. A cut at ``n_blocks`` leaves an empty top segment, so
    the last cut sits between the network's output and the loss (NOTES: theory item 4)."""
    cuts = list(cuts)
    if len(cuts) != segments - 1:
        raise ConfigError(
            f"cuts={cuts} gives {len(cuts) + 1} segments but segments={segments}; give {segments - 1} cuts"
        )
    if any(not 1 <= c <= n_blocks for c in cuts) or cuts != sorted(set(cuts)):
        raise ConfigError(f"cuts={cuts} must be strictly increasing block indices in 1..{n_blocks}")
    return cuts


def partition(model: nn.Sequential, segments: int, cuts: Sequence[int] | None = None) -> list[nn.Sequential]:
    """Split ``model``'s blocks into ``segments`` consecutive ``nn.Sequential`` parts."""
    blocks = list(model.children())
    if cuts is None:
        cuts = balanced_cuts([param_count(b) for b in blocks], segments)
    else:
        cuts = check_cuts(cuts, len(blocks), segments)
    edges = [0, *cuts, len(blocks)]
    return [nn.Sequential(*blocks[a:b]) for a, b in itertools.pairwise(edges)]
