"""A model factory and a data factory, as a user would write them.

``mlp`` is a ``model.factory``: called as ``mlp(input_shape, n_outputs, **model.kwargs)``,
it returns an ``nn.Sequential`` of blocks; cuts fall between blocks, never inside one.
``blobs`` is a ``data.factory``: called as ``blobs(**data.kwargs)``, it returns
``(x_train, y_train, x_test, y_test)``; integer labels make it a classification task.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def mlp(input_shape: tuple[int, ...], n_outputs: int, width: int = 64, depth: int = 3) -> nn.Sequential:
    blocks, n_in = [], math.prod(input_shape)
    for i in range(depth):
        first = [nn.Flatten()] if i == 0 else []  # the first block flattens its input
        blocks.append(nn.Sequential(*first, nn.Linear(n_in, width), nn.ReLU()))
        n_in = width
    return nn.Sequential(*blocks, nn.Sequential(nn.Linear(n_in, n_outputs)))


def blobs(
    samples: int = 1200, dim: int = 16, classes: int = 4, seed: int = 0, test_fraction: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian clusters around random centres: ``classes`` classes in ``dim`` dimensions."""
    generator = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(classes, dim, generator=generator)
    y = torch.randint(0, classes, (samples,), generator=generator)
    x = centres[y] + torch.randn(samples, dim, generator=generator)
    n_test = round(samples * test_fraction)
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]
