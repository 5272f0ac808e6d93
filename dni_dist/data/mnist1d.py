"""A generated MNIST-1D-style set: 10 classes of 1-D signals, no download, deterministic by seed.

The idea is Greydanus's MNIST-1D (2020): each class is one fixed template signal, and an
example is that template put through random nuisance transforms, so that a classifier
must learn invariances, not look-ups. This generator is written from the idea alone; its
templates, transforms and every number below are ours, not the original's.

One example of class c, drawn on a fine circular grid of ``LENGTH * OVERSAMPLE`` points:
1. template: ``TEMPLATES[c]``, 12 hand-written points, linearly interpolated;
2. scale in time and pad: the template covers a random fraction ``width`` of the signal
   (uniform in ``WIDTH``); the rest is zero padding;
3. shift: it starts at a uniformly random position and wraps around the end (circular),
   so no position of the input is tied to a class;
4. amplitude: multiplied by a factor uniform in ``AMPLITUDE``;
5. shear: plus a linear ramp across the whole signal, slope uniform in +-``SHEAR``;
6. correlated noise: white noise smoothed by a circular Gaussian kernel (std
   ``SMOOTH_POINTS`` fine points), rescaled to std ``CORRELATED_NOISE``;
7. downsample: each run of ``OVERSAMPLE`` fine points averaged into one of ``LENGTH``;
8. white noise: N(0, ``WHITE_NOISE``^2) per output point.
Inputs are then standardised by the training set's mean and std (one scalar each, as
for ``digits``) and shaped (1, LENGTH): one channel, a 1-D signal.

Labels are exactly balanced (example i has class i mod 10, then shuffled). Training and
test examples come from two separate random streams of the seed, so the test set does not
depend on the training size and no test example is a training example.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from dni_dist.core.tasks import Task
from dni_dist.data.base import Dataset
from dni_dist.errors import ConfigError

N_TRAIN = 25_000
N_TEST = 5_000
LENGTH = 40
OVERSAMPLE = 4
WIDTH = (0.35, 0.65)
AMPLITUDE = (0.6, 1.4)
SHEAR = 0.6
CORRELATED_NOISE = 0.2
SMOOTH_POINTS = 4.0
WHITE_NOISE = 0.1

# One row per class; values in [-1, 1]. Several classes share a part (a rise, a dip, a
# plateau) so that telling them apart takes the whole shape.
TEMPLATES = torch.tensor(
    [
        [0.0, 0.5, 1.0, 1.0, 0.5, 0.0, 0.0, 0.5, 1.0, 1.0, 0.5, 0.0],  # two bumps
        [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0, 1.0, 0.9, 0.6, 0.3, 0.0],  # one wide plateau
        [0.0, 1.0, 0.0, -1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 1.0, 0.0, 0.0],  # fast oscillation
        [0.0, -0.5, -1.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.0, 0.5, 0.0, 0.0],  # dip then bump
        [0.0, 0.5, 1.0, 1.0, 0.5, 0.0, -0.5, -1.0, -1.0, -0.5, 0.0, 0.0],  # bump then dip
        [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0, -1.0, -0.6, -0.3, 0.0, 0.0],  # ramp up, sharp drop
        [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0],  # two narrow spikes
        [0.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 0.0],  # one wide trough
        [0.0, 1.0, 0.5, 0.0, 0.5, 1.0, 0.5, 0.0, -0.5, -1.0, -0.5, 0.0],  # bump, bump, dip
        [0.0, 0.0, 0.0, 0.5, 1.0, 0.0, -1.0, -0.5, 0.0, 0.0, 0.0, 0.0],  # one narrow wiggle
    ]
)
N_CLASSES = len(TEMPLATES)


def _stream(seed: int, split: str) -> torch.Generator:
    """An independent generator per (seed, split): train and test never share draws."""
    return torch.Generator().manual_seed(seed * 1_000_003 + (1 if split == "test" else 0) + 7)


def _uniform(n: int, bounds: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(n, generator=g)


def _place_templates(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Steps 1-3: each label's template, scaled in time, padded and circularly shifted, on
    the fine grid; shape (n, LENGTH * OVERSAMPLE)."""
    n, fine = len(labels), LENGTH * OVERSAMPLE
    width = _uniform(n, WIDTH, g).unsqueeze(1)
    start = torch.rand(n, 1, generator=g)
    u = (torch.arange(fine) + 0.5) / fine
    # Where each fine point falls in its template, in template points (0..11); outside that
    # range it is padding.
    along = ((u.unsqueeze(0) - start) % 1.0) / width * (TEMPLATES.shape[1] - 1)
    inside = along <= TEMPLATES.shape[1] - 1
    low = along.floor().long().clamp(max=TEMPLATES.shape[1] - 2)
    frac = (along - low).clamp(max=1.0)
    rows = TEMPLATES[labels]
    left, right = rows.gather(1, low), rows.gather(1, low + 1)
    return torch.where(inside, left + frac * (right - left), torch.zeros(()))


def _correlated_noise(n: int, g: torch.Generator) -> torch.Tensor:
    """Step 6: white noise through a circular Gaussian filter, rescaled to CORRELATED_NOISE."""
    fine = LENGTH * OVERSAMPLE
    half = math.ceil(3 * SMOOTH_POINTS)
    offsets = torch.arange(-half, half + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / SMOOTH_POINTS) ** 2)
    kernel = kernel / kernel.norm()  # unit norm: the filtered noise keeps unit variance
    white = torch.randn(n, 1, fine, generator=g)
    smooth = F.conv1d(F.pad(white, (half, half), mode="circular"), kernel.view(1, 1, -1)).squeeze(1)
    return CORRELATED_NOISE * smooth


def _draw(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n examples, classes exactly balanced (up to n mod 10), as (n, LENGTH) and (n,)."""
    labels = (torch.arange(n) % N_CLASSES)[torch.randperm(n, generator=g)]
    signal = _place_templates(labels, g)
    signal = signal * _uniform(n, AMPLITUDE, g).unsqueeze(1)
    ramp = torch.linspace(-0.5, 0.5, LENGTH * OVERSAMPLE).unsqueeze(0)
    signal = signal + _uniform(n, (-SHEAR, SHEAR), g).unsqueeze(1) * ramp
    signal = signal + _correlated_noise(n, g)
    coarse = signal.view(n, LENGTH, OVERSAMPLE).mean(2)
    coarse = coarse + WHITE_NOISE * torch.randn(n, LENGTH, generator=g)
    return coarse, labels


def make_mnist1d(seed: int, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Dataset:
    """The set for ``data.name=mnist1d``; the sizes are arguments for tests, fixed in configs."""
    if n_train < N_CLASSES or n_test < N_CLASSES:
        raise ConfigError(f"mnist1d sizes n_train={n_train}, n_test={n_test}: need at least {N_CLASSES} each")
    x_train, y_train = _draw(n_train, _stream(seed, "train"))
    x_test, y_test = _draw(n_test, _stream(seed, "test"))
    mean, std = x_train.mean(), x_train.std()
    return Dataset(
        "mnist1d",
        ((x_train - mean) / std).unsqueeze(1),
        y_train,
        ((x_test - mean) / std).unsqueeze(1),
        y_test,
        Task("classification", N_CLASSES),
    )
