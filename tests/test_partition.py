from __future__ import annotations

import pytest
from torch import nn

from dni_dist.core.partition import balanced_cuts, param_count, partition
from dni_dist.errors import ConfigError


def test_balanced_cuts_minimise_the_heaviest_segment() -> None:
    assert balanced_cuts([10, 10, 10, 10], 2) == [2]
    assert balanced_cuts([1, 100, 1, 1], 2) == [2]
    assert balanced_cuts([5, 5, 5, 5, 5, 5], 3) == [2, 4]
    assert balanced_cuts([3, 3], 1) == []


def test_impossible_split_names_the_value() -> None:
    with pytest.raises(ConfigError, match="segments=5 is impossible for a model of 4 blocks"):
        balanced_cuts([1, 1, 1, 1], 5)


def test_explicit_cuts_and_an_empty_top_segment() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4), nn.Linear(4, 5))
    parts = partition(model, 2, cuts=[1])
    assert [len(p) for p in parts] == [1, 2]
    parts = partition(model, 2, cuts=[3])  # the cut sits between the output and the loss
    assert [len(p) for p in parts] == [3, 0]
    assert sum(param_count(p) for p in parts) == param_count(model)
    with pytest.raises(ConfigError, match="strictly increasing"):
        partition(model, 3, cuts=[2, 1])
