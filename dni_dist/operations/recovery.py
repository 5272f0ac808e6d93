"""Keeping a run recoverable: snapshots, checkpoints on disk, resume and restarts.

The runner trains in *chunks* (``checkpoint.every`` steps, or whole epochs). Every chunk
ends with all messages delivered, so every stage is between steps: that is when the keeper
takes a snapshot of every stage (in memory, and on disk when ``checkpoint.dir`` is set).
When a stage is lost, the engine replaces its actors and every stage is restored from the
last snapshot; the interrupted chunk is run again. When the numbers blow up, the last
snapshot (the state before the non-finite steps) is written to disk before the run stops.

The keeper holds *handles*, never a distributed run's tensors (a head node would run out
of memory on a large model):

- The in-memory snapshot is what the engine's ``state_handles`` returns. On Ray these are
  object refs: each actor's ``stage_state`` result, owned by the driver and kept in the
  object store of the actor's node (states under Ray's inline limit, about 100 KB, sit in
  the driver's heap; they are small by definition). A stage actor's death does not free
  them, so a restart restores the new actors straight from them (Ray resolves a ref
  passed as a call's argument inside the receiving actor). Taking a new snapshot drops
  the old refs, and Ray frees those objects: the store holds one snapshot per stage (two
  for a moment, while the new one is taken). If the *node* holding a snapshot dies, the
  objects die with it: the restart then falls back to the newest checkpoint on disk
  (``checkpoint.dir``), and without one the run stops with one line saying so
  (``RunFailed``), rather than waiting for state that will never come.
  The local engine keeps copies in its own process.
- On disk each stage writes its own shard (``stage-i.pt``) into the checkpoint's
  temporary directory, from its state at the end of the chunk (the same state as the
  snapshot just taken: nothing ran in between); the driver only writes ``meta.json`` and
  renames the directory into place (operations/checkpoint.py). ``checkpoint.dir`` must
  therefore be one path every stage sees: the keeper checks that at the start and after
  every restart (``check_shared``), and stops the run with a ConfigError naming the
  directory and the node otherwise.
- ``save_last`` (numbers blew up, or restarts are exhausted) writes the last *snapshot*,
  not the current state: after a numeric fault the current state is the bad one, and
  after a lost stage one stage has no current state at all. Into ``checkpoint.dir`` each
  live stage writes its own shard from its snapshot ref; the driver writes the shard of a
  stage whose actor cannot (dead or stuck), and every shard when there is no
  ``checkpoint.dir`` (the fallback ``OUT/checkpoints`` is on the driver's machine, which
  the stages need not see), fetching one stage's snapshot at a time.
- ``--resume`` reads ``meta.json`` on the driver and has each stage load its own shard.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Protocol

from dni_dist.config import TrainConfig
from dni_dist.engines.shards import ShardRecord
from dni_dist.errors import ConfigError, RunFailed, SnapshotLost, StageLost
from dni_dist.operations import checkpoint
from dni_dist.operations.checkpoint import Position


class RecoverableEngine(Protocol):
    step: int

    def state_handles(self) -> list[Any]: ...
    def restore(self, states: list[Any], step: int) -> None: ...
    def write_shards(
        self, directory: Path, handles: list[Any] | None = None, by_stages: bool = True
    ) -> list[ShardRecord]: ...
    def load_shards(self, paths: list[Path], step: int) -> None: ...
    def check_shared(self, directory: Path) -> None: ...


class CheckpointKeeper:
    def __init__(self, config: TrainConfig, steps_per_epoch: int) -> None:
        self.config = config
        self.steps_per_epoch = steps_per_epoch
        # Absolute: the stages' working directories are not the driver's.
        self.directory = Path(config.checkpoint.dir).absolute() if config.checkpoint.dir else None
        self.restarts = 0
        self.redone_steps = 0
        self.checkpoints = 0
        self.resumed_from: str | None = None
        self._snapshot: tuple[Position, list[Any]] | None = None

    def start(self, engine: RecoverableEngine) -> Position:
        """Check checkpoint.dir is shared; resume from the newest checkpoint if asked, else
        start at step 0; take the first snapshot."""
        position = Position(0, 0, 0)
        if self.directory is not None:
            engine.check_shared(self.directory)
        if self.config.checkpoint.resume:
            assert self.directory is not None  # config validation insists
            path = checkpoint.latest(self.directory)
            if path is None:
                where = str(self.directory)
                raise ConfigError(f"--resume: no checkpoint in {where!r}; run once without --resume first")
            position, shards, saved = checkpoint.read(path)
            checkpoint.check_compatible(saved, self.config.to_dict())
            engine.load_shards(shards, position.step)
            self.resumed_from = str(path)
        self._snapshot = (position, engine.state_handles())
        return position

    def chunk(self, position: Position) -> int:
        """Steps to run before the next snapshot: to the next multiple of ``every`` or the epoch's end."""
        left = self.steps_per_epoch - position.offset
        every = self.config.checkpoint.every
        return min(left, every - position.step % every) if every else left

    def after_chunk(self, engine: RecoverableEngine, position: Position) -> bool:
        """Snapshot every stage; True if a checkpoint was written to disk too."""
        # The old snapshot is kept until the new one is complete, then dropped (freed).
        self._snapshot = (position, engine.state_handles())
        if self.directory is None:
            return False
        self._write(engine, self.directory, position, None, by_stages=True)
        checkpoint.prune(self.directory, self.config.checkpoint.keep)
        return True

    def recover(self, engine: Any, lost: StageLost, failed_chunk: int) -> Position:
        """Replace the actors and restore the last snapshot (or, if it was lost, the newest
        checkpoint on disk), or give up past max_restarts."""
        assert self._snapshot is not None
        position, handles = self._snapshot
        self.restarts += 1
        limit = self.config.dist.max_restarts
        if self.restarts > limit:
            saved = self.save_last(engine)
            raise RunFailed(f"{lost}; gave up after {limit} restarts (dist.max_restarts); last checkpoint: {saved}")
        print(
            f"dni-dist: {lost}; restarting every stage from step {position.step} (restart {self.restarts} of {limit})",
            file=sys.stderr,
            flush=True,
        )
        engine.restart()
        if self.directory is not None:
            engine.check_shared(self.directory)  # the new actors may have landed on other nodes
        snapshot_step = position.step
        try:
            engine.restore(handles, position.step)
        except SnapshotLost as gone:
            position = self._restore_from_disk(engine, lost, gone)
        # The interrupted chunk runs again from its start, and anything the disk lacked.
        self.redone_steps += failed_chunk + snapshot_step - position.step
        return position

    def _restore_from_disk(self, engine: Any, lost: StageLost, gone: SnapshotLost) -> Position:
        path = checkpoint.latest(self.directory) if self.directory is not None else None
        if path is None:
            raise RunFailed(
                f"{lost}; {gone} with its node and no checkpoint is on disk (set checkpoint.dir to keep one)"
            ) from None
        position, shards, _ = checkpoint.read(path)
        print(f"dni-dist: {gone}; restoring every stage from {path}", file=sys.stderr, flush=True)
        engine.load_shards(shards, position.step)
        self._snapshot = (position, engine.state_handles())
        return position

    def save_last(self, engine: RecoverableEngine) -> str:
        """Write the last snapshot to disk (checkpoint.dir, else OUT/checkpoints); returns
        where (or, if that snapshot was lost, the newest checkpoint already on disk)."""
        assert self._snapshot is not None
        position, handles = self._snapshot
        directory = self.directory or Path(self.config.out) / "checkpoints"
        try:
            return str(self._write(engine, directory, position, handles, by_stages=self.directory is not None))
        except SnapshotLost as gone:
            newest = checkpoint.latest(directory)
            return f"{newest} ({gone})" if newest else f"none ({gone})"

    def _write(
        self, engine: RecoverableEngine, directory: Path, position: Position, handles: list[Any] | None, by_stages: bool
    ) -> Path:
        tmp = checkpoint.begin(directory, position.step)
        shards = engine.write_shards(tmp, handles, by_stages)
        path = checkpoint.commit(tmp, position, shards, self.config.to_dict())
        self.checkpoints += 1
        return path

    def summary(self) -> dict[str, Any]:
        return {
            "restarts": self.restarts,
            "redone_steps": self.redone_steps,
            "checkpoints": self.checkpoints,
            "resumed_from": self.resumed_from,
        }
