"""Run a training job from a config: data, engine, evaluation, output files.

Writes ``OUT/metrics.jsonl`` (one JSON object per ``log_every`` steps and per epoch,
flushed as each epoch ends) and ``OUT/summary.json`` at the end; tools read both.
Training runs in chunks between snapshots (see operations/recovery.py): a lost stage is restarted
from the last one, a numeric blow-up stops the run with it written to disk.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from dni_dist.builder import load_data
from dni_dist.config import TrainConfig
from dni_dist.core.stage import NumericFault
from dni_dist.data import Dataset
from dni_dist.errors import RunFailed, StageLost, reason
from dni_dist.operations.checkpoint import Position
from dni_dist.operations.monitor import Monitor
from dni_dist.operations.preflight import preflight
from dni_dist.operations.recovery import CheckpointKeeper, RecoverableEngine


class EpochEngine(RecoverableEngine, Protocol):
    """What the runner drives: the keeper's snapshots and shards (RecoverableEngine), plus training."""

    def train_steps(self, epoch: int, offset: int, count: int) -> list[float]: ...
    def stage_states(self) -> list[dict[str, Any]]: ...
    def predict(self, x: torch.Tensor) -> torch.Tensor: ...
    def stage_summaries(self) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


def evaluate(engine: EpochEngine, dataset: Dataset) -> dict[str, float]:
    """Test loss; test accuracy for classification (per token for a language model), and
    test perplexity for a language model."""
    task = dataset.task
    output = engine.predict(dataset.x_test)
    result = {"test_loss": float(task.loss(output, dataset.y_test))}
    if task.kind in ("classification", "language_model"):
        result["test_accuracy"] = task.accuracy(output, dataset.y_test)
    if task.per_token:
        result["test_perplexity"] = task.perplexity(output, dataset.y_test)
    return result


def make_engine(config: TrainConfig, dataset: Dataset, in_memory: bool = False) -> EpochEngine:
    """``in_memory``: the data came from the caller, not from the config."""
    if config.runtime == "ray":
        from dni_dist.engines.ray_engine import RayRun  # Ray is imported only when used

        return RayRun(config, dataset, in_memory)
    from dni_dist.engines.local_run import LocalRun

    return LocalRun(config, dataset)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


@dataclass
class Trained:
    """A finished run: its summary and, when asked for, each stage's trained segment state."""

    summary: dict[str, Any]
    dataset: Dataset
    segment_states: list[dict[str, torch.Tensor]] | None = None


def train(config: TrainConfig, verbose: bool = False) -> dict[str, Any]:
    """Train as ``config`` says; return (and write) the summary."""
    return run(config, verbose).summary


def run(
    config: TrainConfig, verbose: bool = False, dataset: Dataset | None = None, keep_segments: bool = False
) -> Trained:
    """Train as ``config`` says, on ``dataset`` if given (else the config's data); write the
    summary, and with ``keep_segments`` also return the trained segments' states."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    in_memory = dataset is not None
    if dataset is None:
        dataset = load_data(config)
    # Plan the whole run on the meta device first: a distributed run would fail late and far away.
    preflight(config, dataset)
    steps_per_epoch = len(dataset.x_train) // config.data.batch_size
    started = time.perf_counter()
    # The metrics endpoint and progress display (a taken port fails here, before any Ray).
    monitor = Monitor(config, steps_per_epoch, verbose)
    try:
        engine = make_engine(config, dataset, in_memory)
    except BaseException:
        monitor.close()
        raise
    transport = getattr(engine, "config", config).transport  # transport=auto: what the Ray engine chose
    if config.runtime == "ray":
        monitor.hub.transport = transport
    keeper = CheckpointKeeper(config, steps_per_epoch)
    train_seconds = 0.0
    samples = 0
    losses: list[float] = []
    result: dict[str, float] = {}
    try:
        position = keeper.start(engine)
        mode = "a" if keeper.resumed_from else "w"  # a resumed run continues its log
        with (out / "metrics.jsonl").open(mode) as log:
            while position.epoch < config.epochs:
                if position.offset == 0:
                    losses = []
                count = keeper.chunk(position)
                tick = time.perf_counter()
                try:
                    with monitor.epoch(engine, position.epoch):
                        chunk_losses = engine.train_steps(position.epoch, position.offset, count)
                except StageLost as lost:
                    position = keeper.recover(engine, lost, count)
                    monitor.job.record_restart(count)
                    continue
                except NumericFault as fault:
                    raise RunFailed(f"{reason(fault)}; last good checkpoint: {keeper.save_last(engine)}") from None
                train_seconds += time.perf_counter() - tick
                samples += count * config.data.batch_size
                for i in range(len(chunk_losses)):
                    step = position.step + i + 1
                    if step % config.log_every == 0:
                        record = {"event": "step", "epoch": position.epoch, "step": step, "train_loss": chunk_losses[i]}
                        log.write(json.dumps(record) + "\n")
                losses += chunk_losses
                offset = position.offset + count
                epoch_done = offset == steps_per_epoch
                position = Position(position.epoch + epoch_done, 0 if epoch_done else offset, position.step + count)
                if keeper.after_chunk(engine, position):
                    monitor.job.record_checkpoint()
                if not epoch_done:
                    continue
                result = evaluate(engine, dataset)
                record = {
                    "event": "epoch",
                    "epoch": position.epoch,
                    "step": position.step,
                    "train_loss": sum(losses) / len(losses) if losses else None,
                    **result,
                    "samples_per_second": samples / train_seconds if train_seconds else 0.0,
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
                monitor.epoch_end(record)
        if not result:  # resumed at the very end: nothing was trained here
            result = evaluate(engine, dataset)
        stages = engine.stage_summaries()
        segment_states = [state["module"] for state in engine.stage_states()] if keep_segments else None
    finally:
        engine.close()
        monitor.close()
    summary: dict[str, Any] = {
        "method": config.method,
        "segments": config.segments,
        "runtime": config.runtime,
        "transport": transport if config.runtime != "local" else None,
        "schedule": config.dist.schedule if config.runtime != "local" else "lockstep",
        "dataset": dataset.name,
        "loss": dataset.task.loss_name,
        "epochs": config.epochs,
        "test_accuracy": result.get("test_accuracy"),
        "test_loss": result.get("test_loss"),
        # Language models: the vocabulary size V (a uniform guess has perplexity V) and
        # exp(mean test cross-entropy per token).
        **(
            {"vocab_size": dataset.task.n_outputs, "perplexity": result.get("test_perplexity")}
            if dataset.task.per_token
            else {}
        ),
        "train_loss": sum(losses) / len(losses) if losses else None,
        "samples_per_second": samples / train_seconds if train_seconds else 0.0,
        "wall_seconds": time.perf_counter() - started,
        "steps": engine.step,
        **keeper.summary(),
        "stages": stages,
        "config": config.to_dict(),
    }
    _write_json(out / "summary.json", summary)
    return Trained(summary, dataset, segment_states)
