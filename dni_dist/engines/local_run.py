"""The local engine behind the runner's epoch interface."""

from __future__ import annotations

import copy
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from dni_dist.builder import build_stages
from dni_dist.config import TrainConfig
from dni_dist.core.probe import Snapshot, StageProbe
from dni_dist.data import Dataset, batches
from dni_dist.engines.local import LocalEngine
from dni_dist.engines.shards import ShardRecord, read_shard, write_shard


class LocalRun:
    def __init__(self, config: TrainConfig, dataset: Dataset) -> None:
        self.config = config
        self.dataset = dataset
        self.engine = LocalEngine(build_stages(config, dataset.input_shape, dataset.task), delay=config.sg.delay)
        self.probes = [StageProbe(s, config.data.batch_size) for s in self.engine.stages]

    @property
    def step(self) -> int:
        return self.engine.step

    def train_epoch(self, epoch: int) -> list[float]:
        return self.train_steps(epoch, 0, len(self.dataset.x_train) // self.config.data.batch_size)

    def train_steps(self, epoch: int, offset: int, count: int) -> list[float]:
        """Steps ``offset .. offset + count - 1`` of ``epoch``'s batch order."""
        d, bs = self.dataset, self.config.data.batch_size
        order = batches(d.x_train, d.y_train, bs, self.config.seed, epoch)
        losses = [self.engine.train_step(x, y) for x, y in islice(order, offset, offset + count)]
        self.engine.check_numerics()  # the chunk's one read-back of the flags, and of the losses
        return torch.stack(losses).tolist() if losses else []

    def stage_states(self) -> list[dict[str, Any]]:
        self.engine.drain()  # held targets are delivered first, as a drained pipeline would
        return [stage.state_dict() for stage in self.engine.stages]

    def restore(self, states: list[dict[str, Any]], step: int) -> None:
        for stage, state in zip(self.engine.stages, states, strict=True):
            stage.load_state_dict(state)
        self.engine.step = step

    # Snapshots are copies in this process; shards are written and read here, through the
    # same functions the Ray stages use, so either engine reads the other's checkpoints.

    def state_handles(self) -> list[dict[str, Any]]:
        """A snapshot: copies, since training keeps changing the live tensors."""
        return copy.deepcopy(self.stage_states())

    def write_shards(
        self, directory: Path, handles: list[dict[str, Any]] | None = None, by_stages: bool = True
    ) -> list[ShardRecord]:
        states = self.stage_states() if handles is None else handles
        return [write_shard(state, directory, i) for i, state in enumerate(states)]

    def load_shards(self, paths: list[Path], step: int) -> None:
        self.restore([read_shard(path) for path in paths], step)

    def check_shared(self, directory: Path) -> None:
        """One process: the directory it writes is the one it reads."""

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine.predict(x, batch_size=self.config.data.batch_size)

    def stage_summaries(self) -> list[dict[str, Any]]:
        # One step at a time: no in-flight limit applies (in_flight_limit is None).
        return [
            {
                "stage": s.index,
                "parameters": sum(p.numel() for p in s.module.parameters()),
                **s.stats.summary(),
                "in_flight_limit": None,
                "in_flight_bound": None,
                "pending_step_limit": None,
                **meter.summary(),
            }
            for s, meter in zip(self.engine.stages, self.engine.meters, strict=True)
        ]

    def snapshots(self) -> list[Snapshot]:
        """Every stage's metrics now; safe from a monitoring thread while an epoch runs."""
        return [probe.snapshot() for probe in self.probes]

    def close(self) -> None:
        pass
