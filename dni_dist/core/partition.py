"""Cut a sequential model into K segments: at explicit cut points, or balanced so that
the largest segment's parameter count is as small as possible."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import nn

from dni_dist.errors import ConfigError


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def balanced_cuts(weights: Sequence[int], segments: int) -> list[int]:
    """Cut points (block indices, ascending) minimising the heaviest segment.

    Exact dynamic programme over prefix sums: O(n^2 K) for n blocks, trivial at the model
    sizes a cut list is written for. Ties go to the earliest cut, so the result is stable.
    """
    n = len(weights)
    if not 1 <= segments <= n:
        raise ConfigError(f"segments={segments} is impossible for a model of {n} blocks; use 1..{n}")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[k][i]: smallest max-load splitting the first i blocks into k segments.
    best = [[inf] * (n + 1) for _ in range(segments + 1)]
    choice = [[0] * (n + 1) for _ in range(segments + 1)]
    best[0][0] = 0
    for k in range(1, segments + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                load = max(best[k - 1][j], prefix[i] - prefix[j])
                if load < best[k][i]:
                    best[k][i], choice[k][i] = load, j
    cuts, i = [], n
    for k in range(segments, 1, -1):
        i = choice[k][i]
        cuts.append(i)
    return sorted(cuts)


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
