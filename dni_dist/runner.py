"""Run a training job from a config: data, engine, evaluation, output files.

Writes ``OUT/metrics.jsonl`` (one JSON object per ``log_every`` steps and per epoch,
flushed as each epoch ends) and ``OUT/summary.json`` at the end; tools read both.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from dni_dist.builder import load_data
from dni_dist.config import TrainConfig
from dni_dist.data import Dataset
from dni_dist.errors import ConfigError
from dni_dist.monitor import Monitor


class EpochEngine(Protocol):
    step: int

    def train_epoch(self, epoch: int) -> list[float]: ...
    def predict(self, x: torch.Tensor) -> torch.Tensor: ...
    def stage_summaries(self) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


def evaluate(engine: EpochEngine, dataset: Dataset) -> dict[str, float]:
    """Test loss, and test accuracy for classification."""
    task = dataset.task
    output = engine.predict(dataset.x_test)
    result = {"test_loss": float(task.loss(output, dataset.y_test))}
    if task.kind == "classification":
        result["test_accuracy"] = task.correct(output, dataset.y_test) / len(dataset.y_test)
    return result


def make_engine(config: TrainConfig, dataset: Dataset) -> EpochEngine:
    if config.runtime == "ray":
        from dni_dist.engines.ray_engine import RayRun  # Ray is imported only when used

        return RayRun(config, dataset)
    from dni_dist.engines.local_run import LocalRun

    return LocalRun(config, dataset)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def train(config: TrainConfig, verbose: bool = False) -> dict[str, Any]:
    """Train as ``config`` says; return (and write) the summary."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_data(config)
    if len(dataset.x_train) < config.data.batch_size:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} exceeds the {len(dataset.x_train)} training samples; lower it"
        )
    started = time.perf_counter()
    # The metrics endpoint and progress display (a taken port fails here, before any Ray).
    monitor = Monitor(config, len(dataset.x_train) // config.data.batch_size, verbose)
    try:
        engine = make_engine(config, dataset)
    except BaseException:
        monitor.close()
        raise
    train_seconds = 0.0
    samples = 0
    losses: list[float] = []
    result: dict[str, float] = {}
    try:
        with (out / "metrics.jsonl").open("w") as log:
            for epoch in range(config.epochs):
                first_step = engine.step
                tick = time.perf_counter()
                with monitor.epoch(engine, epoch):
                    losses = engine.train_epoch(epoch)
                train_seconds += time.perf_counter() - tick
                samples += len(losses) * config.data.batch_size
                for i in range(config.log_every - 1, len(losses), config.log_every):
                    step_record = {"event": "step", "epoch": epoch, "step": first_step + i + 1, "train_loss": losses[i]}
                    log.write(json.dumps(step_record) + "\n")
                result = evaluate(engine, dataset)
                record = {
                    "event": "epoch",
                    "epoch": epoch + 1,
                    "step": engine.step,
                    "train_loss": sum(losses) / len(losses),
                    **result,
                    "samples_per_second": samples / train_seconds if train_seconds else 0.0,
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
                monitor.epoch_end(record)
        stages = engine.stage_summaries()
    finally:
        engine.close()
        monitor.close()
    summary: dict[str, Any] = {
        "method": config.method,
        "segments": config.segments,
        "runtime": config.runtime,
        "transport": config.transport if config.runtime != "local" else None,
        "schedule": config.dist.schedule if config.runtime != "local" else "lockstep",
        "dataset": dataset.name,
        "loss": dataset.task.loss_name,
        "epochs": config.epochs,
        "test_accuracy": result.get("test_accuracy"),
        "test_loss": result.get("test_loss"),
        "train_loss": sum(losses) / len(losses) if losses else None,
        "samples_per_second": samples / train_seconds if train_seconds else 0.0,
        "wall_seconds": time.perf_counter() - started,
        "steps": engine.step,
        "stages": stages,
        "config": config.to_dict(),
    }
    _write_json(out / "summary.json", summary)
    return summary
