from __future__ import annotations

import pytest
import torch

from dni_dist.config import TrainConfig, load_config


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    # Two cores here: keep torch from oversubscribing them across the suite.
    torch.set_num_threads(1)


def config(*overrides: str) -> TrainConfig:
    """A TrainConfig from ``--set``-style overrides (defaults otherwise)."""
    return load_config(overrides=list(overrides))
