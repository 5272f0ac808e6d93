"""A user's data: ``data.factory = "package.module:function"`` with ``data.kwargs``, or
tensors handed to ``dni_dist.fit``.

The function is called as ``function(**kwargs)`` and returns the whole data set in memory,
as one of:

- ``(x_train, y_train, x_test, y_test)``;
- a mapping with those four keys, and optionally ``task`` ("classification" or
  "regression") and ``n_classes``;
- a ``Dataset`` (its task is used as given).

Tensors or NumPy arrays. The task is inferred when not given: integer labels mean
classification over ``max label + 1`` classes (or ``n_classes``), floating-point labels
mean regression (a 1-D target becomes one output). Every check names the bad value in one
line: inputs must be floating point with one shape, labels of the task's kind and in range,
and each split's inputs and labels of one length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dni_dist.core.imports import resolve
from dni_dist.core.tasks import Task
from dni_dist.data.base import Dataset
from dni_dist.errors import ConfigError

KEY = "data.factory"
_FIELDS = ("x_train", "y_train", "x_test", "y_test")
_TASKS = ("classification", "regression")


def load_from_factory(spec: str, kwargs: Mapping[str, Any], fallback_paths: Sequence[str] = ()) -> Dataset:
    function = resolve(KEY, spec, fallback_paths)
    try:
        returned = function(**kwargs)
    except Exception as exc:  # often kwargs the function does not take
        lines = str(exc).strip().splitlines()
        raise ConfigError(
            f"{KEY}={spec!r} with data.kwargs={dict(kwargs)!r} raised {type(exc).__name__}: {lines[0] if lines else ''}"
        ) from None
    return as_dataset(returned, name=spec, where=f"{KEY}={spec!r}")


def as_dataset(value: Any, name: str, where: str) -> Dataset:
    """Check ``value`` (any of the forms above) and return it as a Dataset."""
    task_kind: str | None = None
    n_classes: int | None = None
    if isinstance(value, Dataset):
        parts = [value.x_train, value.y_train, value.x_test, value.y_test]
        task_kind, n_classes = value.task.kind, value.task.n_outputs
    elif isinstance(value, Mapping):
        missing = [k for k in _FIELDS if k not in value]
        if missing:
            raise ConfigError(f"{where} returned a mapping without {', '.join(missing)}; give all of {_FIELDS}")
        parts = [value[k] for k in _FIELDS]
        task_kind, n_classes = value.get("task"), value.get("n_classes")
        if task_kind is not None and task_kind not in _TASKS:
            raise ConfigError(f"{where}: task={task_kind!r} is unknown; use classification or regression")
        if n_classes is not None and (isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1):
            raise ConfigError(f"{where}: n_classes={n_classes!r} must be a positive integer")
    elif isinstance(value, (tuple, list)) and len(value) == 4:
        parts = list(value)
    else:
        raise ConfigError(
            f"{where} returned {_describe(value)}; return (x_train, y_train, x_test, y_test), "
            "a mapping with those keys, or a Dataset"
        )
    x_train, y_train, x_test, y_test = (_tensor(where, k, v) for k, v in zip(_FIELDS, parts, strict=True))
    x_train, x_test = _inputs(where, x_train, x_test)
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) == 0:
            raise ConfigError(f"{where}: x_{split} is empty; each split needs at least one example")
        if len(y) != len(x):
            raise ConfigError(f"{where}: y_{split} has {len(y)} labels for {len(x)} inputs in x_{split}")
    if task_kind is None:
        task_kind = "regression" if y_train.is_floating_point() else "classification"
    if task_kind == "classification":
        n_outputs = _classes(where, y_train, y_test, n_classes)
        y_train, y_test = y_train.long(), y_test.long()
    else:
        y_train, y_test = _targets(where, y_train, y_test)
        n_outputs = y_train.shape[1]
    task = value.task if isinstance(value, Dataset) else Task(task_kind, n_outputs)
    return Dataset(name, x_train, y_train, x_test, y_test, task)


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _tensor(where: str, key: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if hasattr(value, "__array__"):  # NumPy arrays and friends
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{where}: {key} cannot become a tensor ({exc})") from None
    raise ConfigError(f"{where}: {key} is a {type(value).__name__}; give a tensor or an array")


def _inputs(where: str, x_train: torch.Tensor, x_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for key, x in (("x_train", x_train), ("x_test", x_test)):
        if not x.is_floating_point():
            raise ConfigError(f"{where}: {key} has dtype {x.dtype}; inputs must be floating point (e.g. x.float())")
        if x.dim() < 2:
            raise ConfigError(f"{where}: {key} has shape {tuple(x.shape)}; give (examples, features...)")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ConfigError(
            f"{where}: x_train's examples have shape {tuple(x_train.shape[1:])} but x_test's "
            f"{tuple(x_test.shape[1:])}; they must match"
        )
    dtype = torch.get_default_dtype()  # the model's parameters are of this type
    return x_train.to(dtype), x_test.to(dtype)


def _classes(where: str, y_train: torch.Tensor, y_test: torch.Tensor, n_classes: int | None) -> int:
    for key, y in (("y_train", y_train), ("y_test", y_test)):
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ConfigError(
                f"{where}: {key} has dtype {y.dtype}; classification needs integer class labels "
                "(e.g. y.long()), or give task='regression'"
            )
        if y.dim() != 1:
            raise ConfigError(f"{where}: {key} has shape {tuple(y.shape)}; class labels are one integer per example")
    low = int(min(y_train.min(), y_test.min()))
    high = int(max(y_train.max(), y_test.max()))
    if low < 0:
        raise ConfigError(f"{where}: class label {low} is negative; labels are 0..n_classes-1")
    if n_classes is None:
        return max(high + 1, 2)
    if high >= n_classes and not (n_classes == 1 and high <= 1):  # one class output: a 0/1 logit
        raise ConfigError(f"{where}: class label {high} is out of range for n_classes={n_classes}")
    return n_classes


def _targets(where: str, y_train: torch.Tensor, y_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shaped = []
    for key, y in (("y_train", y_train), ("y_test", y_test)):
        if not y.is_floating_point():
            raise ConfigError(
                f"{where}: {key} has dtype {y.dtype}; regression needs floating-point targets, "
                "or give task='classification'"
            )
        if y.dim() == 1:
            y = y.view(-1, 1)
        if y.dim() != 2:
            raise ConfigError(f"{where}: {key} has shape {tuple(y.shape)}; give (examples,) or (examples, outputs)")
        shaped.append(y.to(torch.get_default_dtype()))
    if shaped[0].shape[1] != shaped[1].shape[1]:
        raise ConfigError(f"{where}: y_train has {shaped[0].shape[1]} outputs but y_test {shaped[1].shape[1]}")
    return shaped[0], shaped[1]
