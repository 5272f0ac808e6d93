"""CIFAR-10 from the official "python version" batches directory (pickled dicts)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from dni_dist.core.tasks import Task
from dni_dist.data.base import Dataset
from dni_dist.errors import ConfigError

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    data = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(entry[b"labels"], dtype=np.int64)
    return data, labels


def load_cifar10(path: str | None) -> Dataset:
    if not path:
        raise ConfigError("dataset 'cifar10' needs data.path=DIR (the extracted cifar-10-batches-py directory)")
    directory = Path(path)
    names = [*TRAIN_BATCHES, "test_batch"]
    missing = [n for n in names if not (directory / n).exists()]
    if missing:
        raise ConfigError(f"data.path={path!r} lacks {', '.join(missing)}; extract cifar-10-python.tar.gz there")
    parts = [_read_batch(directory / n) for n in TRAIN_BATCHES]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = _read_batch(directory / "test_batch")
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)

    def images(a: np.ndarray) -> torch.Tensor:
        return (torch.tensor(a, dtype=torch.float32) / 255.0 - mean) / std

    return Dataset(
        "cifar10",
        images(x_train),
        torch.tensor(y_train),
        images(x_test),
        torch.tensor(y_test),
        Task("classification", 10),
    )
