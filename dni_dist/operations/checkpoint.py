"""Checkpoints: every stage's state at a step boundary, written atomically.

Layout (one directory per checkpoint, newest = highest step)::

    DIR/step-000001234/
        meta.json        position (epoch, offset, step), method, segments, config, format
        stage-0.pt       torch.save of Stage.state_dict(): module and SG parameters,
        stage-1.pt       optimiser states, stochastic-update RNG, step clock, counters
        ...

A checkpoint is first written to ``DIR/.tmp-...``, every file fsynced, then the directory
is renamed into place and ``DIR`` fsynced: a crash leaves either the whole checkpoint or
none of it. Files are read back with ``torch.load(weights_only=True)`` (plain tensors and
containers only, so loading a checkpoint cannot run code).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory: str | Path, position: Position, states: list[dict[str, Any]], config: dict[str, Any]) -> Path:
    """Write one checkpoint atomically; returns its directory."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{position.step:09d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for i, state in enumerate(states):
        torch.save(state, tmp / f"stage-{i}.pt")
    meta = {
        "format": FORMAT_VERSION,
        "epoch": position.epoch,
        "offset": position.offset,
        "step": position.step,
        "segments": len(states),
        "method": config.get("method"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    for file in tmp.iterdir():
        _fsync(file)
    _fsync(tmp)
    if final.exists():  # the same step again (a redone chunk): replace it
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync(root)
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


def load(path: str | Path) -> tuple[Position, list[dict[str, Any]], dict[str, Any]]:
    """(position, per-stage states, the run's config) of one checkpoint directory."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"checkpoint {str(path)!r} is unreadable ({exc.__class__.__name__}); pick another") from None
    if meta.get("format") != FORMAT_VERSION:
        raise ConfigError(
            f"checkpoint {str(path)!r} has format {meta.get('format')!r}; this version reads {FORMAT_VERSION}"
        )
    states = [torch.load(path / f"stage-{i}.pt", weights_only=True) for i in range(meta["segments"])]
    return Position(meta["epoch"], meta["offset"], meta["step"]), states, meta["config"]


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A run resumes only a checkpoint of the same model, method and data."""
    for key in sorted(set(saved) | set(current)):
        if key in _MAY_DIFFER:
            continue
        if saved.get(key) != current.get(key):
            raise ConfigError(
                f"cannot resume: {key}={current.get(key)!r} but the checkpoint was made with {saved.get(key)!r}"
            )
