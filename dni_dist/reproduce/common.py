"""What every reproduction shares: build a run from overrides, train it with the local
engine while recording, and save figures."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dni_dist.builder import build_stages, load_data
from dni_dist.config import TrainConfig, load_config
from dni_dist.core.stage import Stage
from dni_dist.data import Dataset, batches
from dni_dist.engines.local import LocalEngine


@dataclass
class Run:
    config: TrainConfig
    data: Dataset
    engine: LocalEngine
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def stages(self) -> list[Stage]:
        return self.engine.stages

    def loss_on(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float(self.data.task.loss(self.engine.predict(x), y))

    def accuracy_on(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return self.data.task.accuracy(self.engine.predict(x), y)


# ``dni-dist reproduce --set KEY=VALUE``: overrides applied last to every run an experiment
# builds (e.g. model.kind=resnet with data.name=digits16), set by ``reproduce()``.
SETTINGS: ContextVar[tuple[str, ...]] = ContextVar("reproduce_settings", default=())


def build(*overrides: str) -> Run:
    config = load_config(overrides=[*overrides, *SETTINGS.get()])
    data = load_data(config)
    return Run(config, data, LocalEngine(build_stages(config, data.input_shape, data.task)))


def fit(
    run: Run, epochs: int | None = None, every: int = 1, on_record: Callable[[Run, int], None] | None = None
) -> Run:
    """Train; every ``every`` epochs record train loss (whole training set) and test score."""
    cfg, d = run.config, run.data
    epochs = cfg.epochs if epochs is None else epochs
    batch = min(cfg.data.batch_size, len(d.x_train))
    for epoch in range(epochs):
        for x, y in batches(d.x_train, d.y_train, batch, cfg.seed, epoch):
            run.engine.train_step(x, y)
        run.engine.check_numerics()  # non-finite steps are judged once per epoch, not per step
        if (epoch + 1) % every == 0 or epoch + 1 == epochs:
            record = {"epoch": epoch + 1, "train_loss": run.loss_on(d.x_train, d.y_train)}
            if d.task.kind == "classification":
                record["test_accuracy"] = run.accuracy_on(d.x_test, d.y_test)
            run.history.append(record)
            if on_record is not None:
                on_record(run, epoch + 1)
    return run


def figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (4.0, 3.2)) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display here or on a cluster
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)


def save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def publish(out: Path, name: str, finding: str, quick: bool, **numbers: Any) -> dict[str, Any]:
    """Write ``OUT/NAME.json`` (the finding, the size, the numbers, the figures) and return it."""
    payload = {"finding": finding, "quick": quick, **numbers}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    return payload
