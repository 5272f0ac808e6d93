"""Getting stage 0's batches onto its device without stalling the compute thread.

On a GPU, copying each batch from pageable host memory is a synchronous copy on the
thread that also issues the compute. So the training set goes to the device once, when it
takes at most ``DEVICE_FRACTION`` of the device's free memory (batches are then gathered
on the device); otherwise it stays on the host and each batch is gathered into pinned
memory and copied with ``non_blocking=True`` (the copy overlaps the queued compute; the
caching host allocator keeps the pinned block until the copy is done). On a CPU there is
nothing to move.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dni_dist.data.base import batches

# The data set may take this share of the device's free memory; the rest is the stages'.
DEVICE_FRACTION = 0.25


class TrainingSet:
    """One stage 0's training data, placed for ``device``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> None:
        self.device = device
        self.resident = device.type == "cpu"
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            self.resident = x.nbytes + y.nbytes <= DEVICE_FRACTION * free
            if self.resident:
                x, y = x.to(device), y.to(device)
        self.x, self.y = x, y

    def batches(self, batch_size: int, seed: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches (the order of ``data.batches``), on the device."""
        for x, y in batches(self.x, self.y, batch_size, seed, epoch):
            if not self.resident:
                x = x.pin_memory().to(self.device, non_blocking=True)
                y = y.pin_memory().to(self.device, non_blocking=True)
            yield x, y
