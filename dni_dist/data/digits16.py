"""An offline image set big enough for a ResNet: scikit-learn's 8x8 digits, upsampled to
16x16 and augmented deterministically to 21,568 training and 1,796 test images.

The 1,797 originals are split first (75% / 25%, by seed), so no test image is a variant of
a training digit. Each original then yields ``TRAIN_VARIANTS`` (training) or
``TEST_VARIANTS`` (test) images, each a random affine warp of it: rotation within
+-``ROTATE`` degrees, scale in ``SCALE``, shear within +-``SHEAR``, shift within +-``SHIFT``
pixels, then bilinear resampling at 16x16 and Gaussian pixel noise of std ``NOISE``. The
warps come from a generator seeded by (seed, split), so the set is the same on every run.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from dni_dist.core.tasks import Task
from dni_dist.data.base import Dataset, split
from dni_dist.data.digits import load_digits
from dni_dist.errors import ConfigError

SIZE = 16
TRAIN_VARIANTS = 16
TEST_VARIANTS = 4
ROTATE = 15.0
SCALE = (0.85, 1.15)
SHEAR = 0.15
SHIFT = 1.5
NOISE = 0.05


def _warp(images: torch.Tensor, variants: int, g: torch.Generator) -> torch.Tensor:
    """``variants`` random affine warps of each image (N, 1, 8, 8), as (N * variants, 1, 16, 16)."""
    x = images.repeat_interleave(variants, dim=0)
    n = len(x)
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(ROTATE)
    scale = SCALE[0] + (SCALE[1] - SCALE[0]) * torch.rand(n, generator=g)
    shear = (torch.rand(n, generator=g) * 2 - 1) * SHEAR
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (2 * SHIFT / SIZE)  # pixels -> [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, SIZE, SIZE], align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped + NOISE * torch.randn(warped.shape, generator=g)


def make_digits16(seed: int, train_variants: int = TRAIN_VARIANTS, test_variants: int = TEST_VARIANTS) -> Dataset:
    """The set for ``data.name=digits16``; the variant counts are arguments for tests."""
    if train_variants < 1 or test_variants < 1:
        raise ConfigError(f"digits16 variants train={train_variants}, test={test_variants}: need at least 1 each")
    base = load_digits(seed)  # standardised 8x8 images, split by seed
    streams = [torch.Generator().manual_seed(seed * 1_000_003 + 11 + s) for s in (0, 1)]
    x_train = _warp(base.x_train, train_variants, streams[0])
    x_test = _warp(base.x_test, test_variants, streams[1])
    y_train = base.y_train.repeat_interleave(train_variants)
    y_test = base.y_test.repeat_interleave(test_variants)
    # Shuffle once so batches mix digits (the batch order is shuffled too, but a stable
    # order here keeps the set itself independent of how it is consumed).
    x_train, y_train, _, _ = split(x_train, y_train, 0.0, seed)
    mean, std = x_train.mean(), x_train.std()
    return Dataset(
        "digits16", (x_train - mean) / std, y_train, (x_test - mean) / std, y_test, Task("classification", 10)
    )
