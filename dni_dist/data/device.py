"""Getting stage 0's batches onto its device without stalling the compute thread.

On a GPU, copying each batch from pageable host memory is a synchronous copy on the
thread that also issues the compute. So the training set goes to the device once, when it
takes at most ``DEVICE_FRACTION`` of the device's free memory (``fits_on_device``, the one
rule, which ``dni-dist train --check`` also uses to count the set in stage 0's estimate);
batches are then gathered on the device.

Otherwise (or with ``placement="host"``) the set stays in host memory and the batches are
prefetched one ahead: each is gathered straight into a pinned block (from the caching host
allocator, which keeps the block until the copy that reads it is done) and copied with
``non_blocking=True`` on a side CUDA stream, so the copy of batch i+1 runs while batch i
is computed. The compute stream waits for the copy through a CUDA event (no host wait),
and ``record_stream`` tells the device allocator that the batch is used on the compute
stream, so its memory is not handed out again while compute still reads it. Nothing here
reads a device value back to the host. Pinning the whole set instead would page-lock all
of it (it is the set that did not fit a device) and still need a gather per batch.

On a CPU there is nothing to move and nothing to pin (pinning needs CUDA): batches are
plain indexing of the set, whatever the placement.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

import torch

from dni_dist.data.base import batch_indices

# The data set may take this share of the device's free memory; the rest is the stages'.
DEVICE_FRACTION = 0.25
# auto: on the device when it fits, else pinned and prefetched; device / host: as told.
PLACEMENTS = ("auto", "device", "host")

Batch = tuple[torch.Tensor, torch.Tensor]


def fits_on_device(data_bytes: int, free_bytes: int) -> bool:
    """Does a training set of ``data_bytes`` go to a device with ``free_bytes`` free?"""
    return data_bytes <= DEVICE_FRACTION * free_bytes


class TrainingSet:
    """One stage 0's training data, placed for ``device``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, device: torch.device, placement: str = "auto") -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement={placement!r}: use one of {', '.join(PLACEMENTS)}")
        self.device = device
        # On a CPU the set is already where the compute is.
        self.resident = device.type != "cuda"
        if device.type == "cuda" and placement != "host":
            free, _ = torch.cuda.mem_get_info(device)
            self.resident = placement == "device" or fits_on_device(x.nbytes + y.nbytes, free)
            if self.resident:
                x, y = x.to(device), y.to(device)
        self.x, self.y = x, y

    def batches(
        self, batch_size: int, seed: int, epoch: int, start: int = 0, stop: int | None = None
    ) -> Iterator[Batch]:
        """Batches ``start .. stop - 1`` of the epoch (the order of ``data.batches``), on the
        device. Skipped batches are neither gathered nor copied."""
        indices = islice(batch_indices(len(self.x), batch_size, seed, epoch, self.x.device), start, stop)
        if self.resident:
            return ((self.x[idx], self.y[idx]) for idx in indices)
        return _prefetched((self._pinned(idx) for idx in indices), self.device)

    def _pinned(self, idx: torch.Tensor) -> Batch:
        """The batch gathered from the host set straight into pinned memory."""
        return _gather_pinned(self.x, idx), _gather_pinned(self.y, idx)


def _gather_pinned(source: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    out = torch.empty((len(idx), *source.shape[1:]), dtype=source.dtype, pin_memory=True)
    return torch.index_select(source, 0, idx, out=out)


def _prefetched(host: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """``host``'s pinned batches on ``device``, each copy issued one batch ahead."""
    copier = torch.cuda.Stream(device)
    ahead: tuple[Batch, torch.cuda.Event] | None = None
    for batch in host:
        issued = _copy(batch, device, copier)  # batch i+1 starts copying before batch i is used
        if ahead is not None:
            yield _hand_over(*ahead, device)
        ahead = issued
    if ahead is not None:
        yield _hand_over(*ahead, device)


def _copy(batch: Batch, device: torch.device, copier: torch.cuda.Stream) -> tuple[Batch, torch.cuda.Event]:
    """Issue the batch's host-to-device copy on ``copier``; the event marks its end."""
    with torch.cuda.stream(copier):
        on_device = tuple(t.to(device, non_blocking=True) for t in batch)
        done = torch.cuda.Event()
        done.record(copier)
    return (on_device[0], on_device[1]), done


def _hand_over(batch: Batch, done: torch.cuda.Event, device: torch.device) -> Batch:
    """Make the compute stream (the current one) wait for the copy, and tell the allocator
    the batch is used there: both queue on the device, neither waits on the host."""
    compute = torch.cuda.current_stream(device)
    compute.wait_event(done)
    for t in batch:
        t.record_stream(compute)
    return batch
