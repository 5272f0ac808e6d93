"""One stage's checkpoint shard on disk, and the token that proves a directory is shared.

A shard is ``torch.save`` of a stage's state (plain tensors and containers, on the CPU so
that any engine on any device can read it), fsynced before its writer reports it. The
writer is whoever holds the state: a Ray stage actor writes its own shard, so the tensors
never pass through the driver (operations/checkpoint.py assembles the checkpoint around
the shards). Shards are read with ``weights_only=True``: loading one cannot run code.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TOKEN_PREFIX = ".visible-"


@dataclass(frozen=True)
class ShardRecord:
    """What a writer reports: the shard's file name in the checkpoint and its size."""

    file: str
    bytes: int


def shard_name(stage: int) -> str:
    return f"stage-{stage}.pt"


def to_cpu(obj: Any) -> Any:
    """A copy of ``obj`` with every tensor on the CPU (containers rebuilt, the rest as is)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(state: dict[str, Any], directory: str | Path, stage: int) -> ShardRecord:
    """Save ``state`` as ``directory/stage-<stage>.pt``, fsynced; the directory must exist."""
    path = Path(directory) / shard_name(stage)
    torch.save(to_cpu(state), path)
    fsync_path(path)
    return ShardRecord(path.name, path.stat().st_size)


def read_shard(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    return torch.load(path, weights_only=True, map_location=device)


def write_token(directory: str | Path) -> tuple[Path, str]:
    """A fresh token file in ``directory`` (created if missing), fsynced: (its path, its text)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    path = root / f"{TOKEN_PREFIX}{token[:12]}"
    path.write_text(token)
    fsync_path(path)
    return path, token


def read_token(path: str | Path) -> str | None:
    """The token's text as this process sees it; None when the file is not there."""
    try:
        return Path(path).read_text()
    except OSError:
        return None
