"""The in-memory dataset every loader returns, and deterministic batching."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dni_dist.core.tasks import Task


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    task: Task

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Deterministic shuffled train/test split."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, epoch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled mini-batches of one epoch; the order depends only on (seed, epoch).

    The last incomplete batch is dropped so every step has the same shapes (the
    distributed engine's wire format and batch-norm statistics rely on that).
    """
    for idx in batch_indices(len(x), batch_size, seed, epoch, x.device):
        yield x[idx], y[idx]


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, device: torch.device) -> Iterator[torch.Tensor]:
    """The sample indices of each of ``batches``' mini-batches, on ``device``."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    # Drawn on the host (the same order on any device), moved once per epoch: data on a GPU
    # is then gathered there without a host-to-device copy per batch.
    perm = torch.randperm(n, generator=generator).to(device)
    for start in range(0, n - batch_size + 1, batch_size):
        yield perm[start : start + batch_size]
