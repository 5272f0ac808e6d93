"""Keeping a run recoverable: snapshots, checkpoints on disk, resume and restarts.

The runner trains in *chunks* (``checkpoint.every`` steps, or whole epochs). Every chunk
ends with all messages delivered, so every stage is between steps: that is when the keeper
takes a snapshot of every stage (in memory, and on disk when ``checkpoint.dir`` is set).
When a stage is lost, the engine replaces its actors and every stage is restored from the
last snapshot; the interrupted chunk is run again. When the numbers blow up, the last
snapshot (the state before the non-finite steps) is written to disk before the run stops.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Protocol

from dni_dist.config import TrainConfig
from dni_dist.errors import ConfigError, RunFailed, StageLost
from dni_dist.operations import checkpoint
from dni_dist.operations.checkpoint import Position


class RecoverableEngine(Protocol):
    step: int

    def stage_states(self) -> list[dict[str, Any]]: ...
    def restore(self, states: list[dict[str, Any]], step: int) -> None: ...


class CheckpointKeeper:
    def __init__(self, config: TrainConfig, steps_per_epoch: int) -> None:
        self.config = config
        self.steps_per_epoch = steps_per_epoch
        self.directory = config.checkpoint.dir
        self.restarts = 0
        self.redone_steps = 0
        self.checkpoints = 0
        self.resumed_from: str | None = None
        self._snapshot: tuple[Position, list[dict[str, Any]]] | None = None

    def start(self, engine: RecoverableEngine) -> Position:
        """Resume from the newest checkpoint if asked, else start at step 0; take the first snapshot."""
        position = Position(0, 0, 0)
        if self.config.checkpoint.resume:
            assert self.directory is not None  # config validation insists
            path = checkpoint.latest(self.directory)
            if path is None:
                raise ConfigError(f"--resume: no checkpoint in {self.directory!r}; run once without --resume first")
            position, states, saved = checkpoint.load(path)
            checkpoint.check_compatible(saved, self.config.to_dict())
            engine.restore(states, position.step)
            self.resumed_from = str(path)
        self._snapshot = (position, self._copy(engine.stage_states()))
        return position

    def chunk(self, position: Position) -> int:
        """Steps to run before the next snapshot: to the next multiple of ``every`` or the epoch's end."""
        left = self.steps_per_epoch - position.offset
        every = self.config.checkpoint.every
        return min(left, every - position.step % every) if every else left

    def after_chunk(self, engine: RecoverableEngine, position: Position) -> bool:
        """Snapshot every stage; True if a checkpoint was written to disk too."""
        states = self._copy(engine.stage_states())
        self._snapshot = (position, states)
        if not self.directory:
            return False
        checkpoint.save(self.directory, position, states, self.config.to_dict())
        checkpoint.prune(self.directory, self.config.checkpoint.keep)
        self.checkpoints += 1
        return True

    def recover(self, engine: Any, lost: StageLost, failed_chunk: int) -> Position:
        """Replace the actors and restore the last snapshot, or give up past max_restarts."""
        assert self._snapshot is not None
        position, states = self._snapshot
        self.restarts += 1
        limit = self.config.dist.max_restarts
        if self.restarts > limit:
            saved = self.save_last()
            raise RunFailed(f"{lost}; gave up after {limit} restarts (dist.max_restarts); last checkpoint: {saved}")
        print(
            f"dni-dist: {lost}; restarting every stage from step {position.step} (restart {self.restarts} of {limit})",
            file=sys.stderr,
            flush=True,
        )
        engine.restart()
        engine.restore(states, position.step)
        self.redone_steps += failed_chunk  # the interrupted chunk runs again from its start
        return position

    def save_last(self) -> str:
        """Write the last snapshot to disk (checkpoint.dir, else OUT/checkpoints); returns where."""
        assert self._snapshot is not None
        position, states = self._snapshot
        directory = self.directory or str(Path(self.config.out) / "checkpoints")
        path = checkpoint.save(directory, position, states, self.config.to_dict())
        self.checkpoints += 1
        return str(path)

    def _copy(self, states: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # In-process engines hand out live tensors that training keeps changing.
        return copy.deepcopy(states) if self.config.runtime == "local" else states

    def summary(self) -> dict[str, Any]:
        return {
            "restarts": self.restarts,
            "redone_steps": self.redone_steps,
            "checkpoints": self.checkpoints,
            "resumed_from": self.resumed_from,
        }
