"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download)."""

from __future__ import annotations

import torch

from dni_dist.core.tasks import Task
from dni_dist.data.base import Dataset, split


def load_digits(seed: int, test_fraction: float = 0.25) -> Dataset:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(bunch.target, dtype=torch.long)
    x_train, y_train, x_test, y_test = split(x, y, test_fraction, seed)
    mean, std = x_train.mean(), x_train.std()
    return Dataset("digits", (x_train - mean) / std, y_train, (x_test - mean) / std, y_test, Task("classification", 10))
