"""Ctrl-C that is never lost.

Python turns SIGINT into a KeyboardInterrupt raised in whatever the main thread runs next.
While a run waits on Ray that can be a library's callback or finaliser that swallows it
(CI saw one: a run signalled after its first epoch trained all 500 and exited 0). So the
command line installs a handler that first records the request, then raises as usual; the
runner calls ``check`` between chunks, which raises again if a KeyboardInterrupt was
swallowed on the way. A library caller (``dni_dist.fit``) installs nothing: its process's
signals are its own, and ``check`` never fires.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_requested = threading.Event()


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _requested.set()
    raise KeyboardInterrupt


@contextmanager
def recorded() -> Iterator[None]:
    """Within this block SIGINT is recorded before it raises (main thread only: Python
    accepts handlers there alone; elsewhere the block changes nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested.clear()


def check() -> None:
    """Raise KeyboardInterrupt if a SIGINT came since ``recorded`` began."""
    if _requested.is_set():
        raise KeyboardInterrupt
