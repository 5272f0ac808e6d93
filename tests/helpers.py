"""Shared test helpers: build stages from overrides, run lockstep steps."""

from __future__ import annotations

import torch

from dni_dist.builder import build_stages, load_data
from dni_dist.config import load_config
from dni_dist.data import Dataset, batches
from dni_dist.engines.local import LocalEngine
from dni_dist.stage import Stage


def stages_for(*overrides: str) -> tuple[list[Stage], Dataset]:
    cfg = load_config(overrides=list(overrides))
    data = load_data(cfg)
    return build_stages(cfg, data.input_shape, data.task), data


def first_batch(data: Dataset, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    return next(batches(data.x_train, data.y_train, size, seed=0, epoch=0))


def train_steps(engine: LocalEngine, data: Dataset, steps: int, size: int = 32) -> None:
    for i, (x, y) in enumerate(batches(data.x_train, data.y_train, size, seed=0, epoch=0)):
        if i == steps:
            break
        engine.train_step(x, y)


def flat_params(stages: list[Stage]) -> torch.Tensor:
    tensors = [p.detach().flatten() for s in stages for p in s.module.parameters()]
    tensors += [p.detach().flatten() for s in stages if s.boundary is not None for p in s.boundary.parameters()]
    return torch.cat(tensors)
