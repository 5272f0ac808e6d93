"""Datasets, all deterministic by seed. ``load_dataset`` is the one entry point.

Bottom layer, beside ``core``: a dataset knows its task (``core.tasks``) and nothing of
models, stages or engines."""

from __future__ import annotations

from dni_dist.data.artificial import make_artificial
from dni_dist.data.base import Dataset, batches
from dni_dist.data.cifar import load_cifar10
from dni_dist.data.digits import load_digits
from dni_dist.data.digits16 import make_digits16
from dni_dist.data.mnist import load_mnist
from dni_dist.data.mnist1d import make_mnist1d
from dni_dist.data.text import load_text
from dni_dist.errors import ConfigError

DATASETS: tuple[str, ...] = ("digits", "mnist", "cifar10", "artificial", "mnist1d", "text", "digits16")

__all__ = ["DATASETS", "Dataset", "batches", "load_dataset"]


def load_dataset(
    name: str,
    seed: int,
    path: str | None = None,
    download: bool = False,
    task: str = "classification",
    dim: int = 2,
    labels: str = "separable",
    samples: int = 1000,
    outputs: int = 1,
    grid: bool = False,
    context: int = 64,
    max_bytes: int = 1 << 20,
) -> Dataset:
    if name == "digits":
        return load_digits(seed)
    if name == "mnist":
        return load_mnist(path, download)
    if name == "cifar10":
        return load_cifar10(path)
    if name == "artificial":
        return make_artificial(task, dim, labels, samples, seed, outputs, grid)
    if name == "mnist1d":
        return make_mnist1d(seed)
    if name == "text":
        return load_text(path, seed, context, max_bytes)
    if name == "digits16":
        return make_digits16(seed)
    raise ConfigError(f"dataset={name!r} is unknown; use one of {', '.join(DATASETS)}")
