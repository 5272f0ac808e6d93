"""Run a training job from a config: data, stages, engine, evaluation, output files.

Writes ``OUT/metrics.jsonl`` (one JSON object per log interval and per epoch, flushed as
it goes) and ``OUT/summary.json`` at the end; tools read both.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from dni_dist.builder import build_stages, load_data
from dni_dist.config import TrainConfig
from dni_dist.data import Dataset, batches
from dni_dist.engines.local import LocalEngine
from dni_dist.errors import ConfigError
from dni_dist.tasks import Task


class Engine(Protocol):
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float: ...
    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor: ...


def evaluate(engine: Engine, dataset: Dataset) -> dict[str, float]:
    """Test loss, and test accuracy for classification."""
    task: Task = dataset.task
    output = engine.predict(dataset.x_test)
    result = {"test_loss": float(task.loss(output, dataset.y_test))}
    if task.kind == "classification":
        result["test_accuracy"] = task.correct(output, dataset.y_test) / len(dataset.y_test)
    return result


class MetricsLog:
    """Append-only JSON lines; each line is flushed so a crash loses nothing written."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("w")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def train(config: TrainConfig, verbose: bool = False) -> dict[str, Any]:
    """Train as ``config`` says; return (and write) the summary."""
    if config.runtime != "local":
        raise ConfigError(f"runtime={config.runtime!r} is not available in this build; use runtime=local")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dataset = load_data(config)
    if len(dataset.x_train) < config.data.batch_size:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} exceeds the {len(dataset.x_train)} training samples; lower it"
        )
    engine = LocalEngine(build_stages(config, dataset.input_shape, dataset.task))
    log = MetricsLog(out / "metrics.jsonl")
    bs = config.data.batch_size
    train_seconds = 0.0
    samples = 0
    losses: list[float] = []
    result: dict[str, float] = {}
    started = time.perf_counter()
    try:
        for epoch in range(config.epochs):
            epoch_losses = []
            tick = time.perf_counter()
            for i, (x, y) in enumerate(batches(dataset.x_train, dataset.y_train, bs, config.seed, epoch)):
                loss = engine.train_step(x, y)
                epoch_losses.append(loss)
                samples += len(x)
                if (i + 1) % config.log_every == 0:
                    log.write({"event": "step", "epoch": epoch, "step": engine.step, "train_loss": loss})
            train_seconds += time.perf_counter() - tick
            losses = epoch_losses
            result = evaluate(engine, dataset)
            record = {
                "event": "epoch",
                "epoch": epoch + 1,
                "step": engine.step,
                "train_loss": sum(epoch_losses) / len(epoch_losses),
                **result,
                "samples_per_second": samples / train_seconds if train_seconds else 0.0,
            }
            log.write(record)
            if verbose:
                shown = " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k != "event"
                )
                print(shown, flush=True)
    finally:
        log.close()
    summary: dict[str, Any] = {
        "method": config.method,
        "segments": config.segments,
        "runtime": config.runtime,
        "transport": config.transport if config.runtime != "local" else None,
        "dataset": dataset.name,
        "loss": dataset.task.loss_name,
        "epochs": config.epochs,
        "test_accuracy": result.get("test_accuracy"),
        "test_loss": result.get("test_loss"),
        "train_loss": sum(losses) / len(losses) if losses else None,
        "samples_per_second": samples / train_seconds if train_seconds else 0.0,
        "wall_seconds": time.perf_counter() - started,
        "steps": engine.step,
        "stages": [
            {"stage": s.index, "parameters": sum(p.numel() for p in s.module.parameters()), **s.stats.summary()}
            for s in engine.stages
        ],
        "config": config.to_dict(),
    }
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "summary.json")
    return summary
