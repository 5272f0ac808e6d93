"""A byte-level language-modelling set from text files, deterministic by seed, no download.

Tokens are bytes (vocabulary 256), so any text in any encoding works and nothing is fitted
to the corpus. The corpus is ``data.path`` (a file, or a directory read recursively in
sorted order; files that are not text, holding a NUL byte or not UTF-8, are skipped),
joined with newlines and cut at ``max_bytes``. With no path it is the Python standard
library's own source on this machine: the sorted ``*.py`` files beside the ``os`` module,
real English-and-code text that every machine with Python has (Ray requires one Python
version across a cluster, so every node builds the same corpus).

Examples are the non-overlapping windows of ``context`` + 1 bytes: x = tokens[t : t + T],
y = tokens[t + 1 : t + T + 1], the next byte at every position. Windows are split into
train and test at random by the seed (10% test).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dni_dist.core.tasks import Task
from dni_dist.data.base import Dataset, split
from dni_dist.errors import ConfigError

VOCAB = 256
TEST_FRACTION = 0.1


def _is_text(raw: bytes) -> bool:
    if b"\0" in raw:
        return False
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file())


def read_corpus(path: str | None, max_bytes: int) -> bytes:
    """The corpus: up to ``max_bytes`` of text from ``path``, or of the standard library."""
    if path is None:
        root, files = Path(os.__file__).parent, sorted(Path(os.__file__).parent.glob("*.py"))
    else:
        root = Path(path).expanduser()
        if not root.exists():
            raise ConfigError(f"data.path={path!r} does not exist; give a text file or a directory of them")
        files = _files(root)
    parts: list[bytes] = []
    size = 0
    for file in files:
        if size >= max_bytes:
            break
        try:
            raw = file.read_bytes()
        except OSError:  # unreadable (permissions, a dangling link): not part of the corpus
            continue
        if raw and _is_text(raw):
            parts.append(raw)
            size += len(raw) + 1
    corpus = b"\n".join(parts)[:max_bytes]
    if not corpus:
        raise ConfigError(f"data.path={str(root)!r} holds no text files (UTF-8 without NUL bytes)")
    return corpus


def load_text(path: str | None, seed: int, context: int, max_bytes: int) -> Dataset:
    """The set for ``data.name=text``: windows of ``context`` tokens and their next tokens."""
    corpus = read_corpus(path, max_bytes)
    tokens = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
    windows = (len(tokens) - 1) // context
    if windows < 2:  # at least one training and one test window
        where = f"data.path={path!r}" if path is not None else "the standard-library corpus"
        raise ConfigError(
            f"{where} gives {len(tokens)} bytes of text (data.max_bytes={max_bytes}): too few for two windows of "
            f"data.context={context} + 1 tokens; give more text or a shorter context"
        )
    starts = torch.arange(windows) * context
    offsets = torch.arange(context)
    x = tokens[starts[:, None] + offsets]
    y = tokens[starts[:, None] + offsets + 1]
    test_fraction = max(TEST_FRACTION, 1 / windows)  # never an empty test set
    x_train, y_train, x_test, y_test = split(x, y, test_fraction, seed)
    return Dataset("text", x_train, y_train, x_test, y_test, Task("language_model", VOCAB, positions=context))
