"""The paper's artificial data (its generators are not in the text; these are ours).

- regression: x ~ N(0, I_d), y = x W + b + noise, W ~ N(0, 1/d), ``outputs`` targets;
  ``labels`` = ``separable`` means noise-free, ``noisy`` adds N(0, 0.5^2) noise,
  ``random`` makes y independent of x.
- classification (binary): x ~ N(0, I_d), label = [x w > 0]; ``separable``: exactly
  that, ``noisy``: 10% of labels flipped, ``random``: coin flips. ``outputs=1`` gives one
  logit (sigmoid loss), ``outputs=2`` two (softmax, one-hot labels).
- ``grid=True`` puts the inputs on a regular grid over [-2, 2]^2 (2-D only; ``samples``
  rounded to a square) instead of drawing them, for pictures of a loss over input space.
Dimension ``dim`` is 2 or 100 in the paper; any d >= 1 works.
"""

from __future__ import annotations

import torch

from dni_dist.core.tasks import Task
from dni_dist.data.base import Dataset, split
from dni_dist.errors import ConfigError

LABELINGS = ("separable", "noisy", "random")


def make_artificial(
    task: str, dim: int, labels: str, samples: int, seed: int, outputs: int = 1, grid: bool = False
) -> Dataset:
    if labels not in LABELINGS:
        raise ConfigError(f"data.labels={labels!r} is unknown; use one of {', '.join(LABELINGS)}")
    if dim < 1 or samples < 8:
        raise ConfigError(f"data.dim={dim}, data.samples={samples}: need dim >= 1 and samples >= 8")
    g = torch.Generator().manual_seed(seed)
    if grid:
        if dim != 2:
            raise ConfigError(f"data.grid needs data.dim=2, got data.dim={dim}")
        side = max(3, round(samples**0.5))
        axis = torch.linspace(-2.0, 2.0, side)
        x = torch.cartesian_prod(axis, axis)
        samples = len(x)
    else:
        x = torch.randn(samples, dim, generator=g)
    if task == "regression":
        w = torch.randn(dim, outputs, generator=g) / dim**0.5
        y = x @ w + 0.1 * torch.randn(outputs, generator=g)
        if labels == "noisy":
            y = y + 0.5 * torch.randn(samples, outputs, generator=g)
        elif labels == "random":
            y = torch.randn(samples, outputs, generator=g)
        the_task = Task("regression", outputs)
    elif task == "classification":
        w = torch.randn(dim, generator=g)
        y = (x @ w > 0).long()
        if labels == "noisy":
            flip = torch.rand(samples, generator=g) < 0.1
            y = torch.where(flip, 1 - y, y)
        elif labels == "random":
            y = torch.randint(0, 2, (samples,), generator=g)
        if outputs > 2:
            raise ConfigError(f"data.outputs={outputs}: artificial classification is binary; use 1 or 2")
        the_task = Task("classification", outputs)
    else:
        raise ConfigError(f"data.task={task!r} is unknown; use classification or regression")
    if grid:  # the grid is the picture: train on all of it, test on the same points
        name = f"artificial-grid-{labels}"
        return Dataset(name, x, y, x, y, the_task)
    x_train, y_train, x_test, y_test = split(x, y, 0.2, seed + 1)
    name = f"artificial-{task}-{labels}-{dim}d"
    return Dataset(name, x_train, y_train, x_test, y_test, the_task)
