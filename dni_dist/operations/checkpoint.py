"""Checkpoints: every stage's state at a step boundary, written atomically.

Layout (one directory per checkpoint, newest = highest step)::

    DIR/step-000001234/
        meta.json        position (epoch, offset, step), method, segments, config, format,
                         shards (each shard's file name and size in bytes)
        stage-0.pt       torch.save of Stage.state_dict(): module and SG parameters,
        stage-1.pt       optimiser states, stochastic-update RNG, step clock, counters
        ...

A checkpoint is written in three moves: ``begin`` makes ``DIR/.tmp-...``; whoever holds a
stage's state writes and fsyncs its shard there (engines/shards.py; on Ray each stage actor
writes its own, so the driver never holds the tensors); ``commit`` checks every shard is
there with the size its writer reported, writes and fsyncs ``meta.json`` and the directory,
and renames it into place, then fsyncs ``DIR``: a crash leaves either the whole checkpoint
or none of it. Files are read back with ``torch.load(weights_only=True)`` (plain tensors
and containers only, so loading a checkpoint cannot run code). ``shards`` in meta.json was
added without a format change: older checkpoints (without it) name their shards
``stage-<i>.pt``, as every checkpoint still does.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dni_dist.engines.shards import ShardRecord, fsync_path, read_shard, shard_name, write_shard
from dni_dist.errors import ConfigError

FORMAT_VERSION = 1
# Config keys a resumed run may change; anything else must match the checkpoint's run.
_MAY_DIFFER = (
    "epochs",
    "out",
    "log_every",
    "metrics_port",
    "progress",
    "runtime",
    "transport",
    "dist",
    "checkpoint",
    "nan_limit",
)


@dataclass(frozen=True)
class Position:
    """Where training stands: ``offset`` steps into ``epoch``, ``step`` steps in total."""

    epoch: int
    offset: int
    step: int


def save(directory: str | Path, position: Position, states: list[dict[str, Any]], config: dict[str, Any]) -> Path:
    """Write one checkpoint atomically from states in this process; returns its directory."""
    tmp = begin(directory, position.step)
    shards = [write_shard(state, tmp, i) for i, state in enumerate(states)]
    return commit(tmp, position, shards, config)


def begin(directory: str | Path, step: int) -> Path:
    """A fresh temporary directory in ``directory`` for the checkpoint of ``step``."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step:09d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit(tmp: Path, position: Position, shards: list[ShardRecord], config: dict[str, Any]) -> Path:
    """Finish a checkpoint whose shards are written in ``tmp`` (from ``begin``); returns its directory."""
    for shard in shards:
        found = tmp / shard.file
        size = found.stat().st_size if found.is_file() else None
        if size != shard.bytes:  # a writer that saw another directory, or a short write
            raise RuntimeError(f"checkpoint shard {str(found)!r}: {shard.bytes} bytes written, {size} found")
    meta = {
        "format": FORMAT_VERSION,
        "epoch": position.epoch,
        "offset": position.offset,
        "step": position.step,
        "segments": len(shards),
        "shards": [{"file": s.file, "bytes": s.bytes} for s in shards],
        "method": config.get("method"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    fsync_path(tmp / "meta.json")  # the shards were fsynced by their writers
    fsync_path(tmp)
    root = tmp.parent
    final = root / f"step-{position.step:09d}"
    if final.exists():  # the same step again (a redone chunk): replace it
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_path(root)
    return final


def prune(directory: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (and leftovers of crashed writes)."""
    root = Path(directory)
    for path in list_checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for leftover in root.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "meta.json").is_file())


def latest(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def read(path: str | Path) -> tuple[Position, list[Path], dict[str, Any]]:
    """(position, each stage's shard path, the run's config) of one checkpoint directory;
    reads no tensors (on Ray each stage loads its own shard)."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"checkpoint {str(path)!r} is unreadable ({exc.__class__.__name__}); pick another") from None
    if meta.get("format") != FORMAT_VERSION:
        raise ConfigError(
            f"checkpoint {str(path)!r} has format {meta.get('format')!r}; this version reads {FORMAT_VERSION}"
        )
    files = [s["file"] for s in meta["shards"]] if "shards" in meta else None
    files = files or [shard_name(i) for i in range(meta["segments"])]
    return Position(meta["epoch"], meta["offset"], meta["step"]), [path / f for f in files], meta["config"]


def load(path: str | Path) -> tuple[Position, list[dict[str, Any]], dict[str, Any]]:
    """(position, per-stage states, the run's config) of one checkpoint directory."""
    position, shards, config = read(path)
    return position, [read_shard(shard) for shard in shards], config


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A run resumes only a checkpoint of the same model, method and data."""
    for key in sorted(set(saved) | set(current)):
        if key in _MAY_DIFFER:
            continue
        if saved.get(key) != current.get(key):
            raise ConfigError(
                f"cannot resume: {key}={current.get(key)!r} but the checkpoint was made with {saved.get(key)!r}"
            )
