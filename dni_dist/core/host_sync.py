"""Counting host read-backs: the calls that make the CPU wait for a device.

A stage's hot path must never read a device tensor back to the host: on a GPU every such
read (``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``if t:``, ``.tolist()``,
``.cpu()``) waits for every kernel queued before it, so the CPU can never run ahead.
Every scalar read goes through one ATen operator, ``aten._local_scalar_dense``, whatever
the device; a dispatch mode sees it even on a CPU, which is what lets a CPU-only test prove
a GPU property. Copies from a device to the CPU and ``tolist``/``numpy`` are counted too.

``torch.cuda.set_sync_debug_mode("error")`` is the GPU's own check; this one runs anywhere.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR_READ = torch.ops.aten._local_scalar_dense.default
_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
_HOST_VIEWS = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy"}


def _device_to_host(func: Any, args: tuple, kwargs: dict) -> bool:
    """Is this a copy from a non-CPU device into host memory?"""
    if func is torch.ops.aten.copy_.default:
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and src.device.type != "cpu"
    src = args[0]
    target = kwargs.get("device")
    return src.device.type != "cpu" and target is not None and torch.device(target).type == "cpu"


def _record(counts: Counter[str], on_sync: Callable[[str], None] | None, what: str) -> None:
    """Count one host read-back (both modes see different kinds) and report it."""
    counts[what] += 1
    if on_sync is not None:
        on_sync(what)


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counts: Counter[str], on_sync: Callable[[str], None] | None) -> None:
        super().__init__()
        self.counts = counts
        self.on_sync = on_sync

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        what = None
        if func is _SCALAR_READ:
            what = "scalar read"
        elif func in _COPIES and _device_to_host(func, args, kwargs):
            what = "device to host copy"
        if what is not None:
            _record(self.counts, self.on_sync, what)
        return func(*args, **kwargs)


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, counts: Counter[str], on_sync: Callable[[str], None] | None) -> None:
        super().__init__()
        self.counts = counts
        self.on_sync = on_sync

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        what = _HOST_VIEWS.get(func)
        if what is not None:
            _record(self.counts, self.on_sync, what)
        return func(*args, **(kwargs or {}))


@contextmanager
def count_host_syncs(on_sync: Callable[[str], None] | None = None) -> Iterator[Counter[str]]:
    """Count host read-backs in this thread while the block runs: yields a Counter of kinds
    (``scalar read``, ``device to host copy``, ``tolist``, ``numpy``). ``on_sync(kind)``
    is called at each one (raise from it to find where a read-back happens)."""
    counts: Counter[str] = Counter()
    with _FunctionCounter(counts, on_sync), _DispatchCounter(counts, on_sync):
        yield counts
