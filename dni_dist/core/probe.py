"""What one stage reports about itself: a plain-data snapshot, read from any thread.

The engines take snapshots (a dict of numbers, cheap to pickle across a Ray call) and the
operations layer (``operations/metrics.py``) turns them into Prometheus families; keeping
the reading here lets the engines report without knowing about Prometheus.
"""

from __future__ import annotations

import time
from typing import Any

from dni_dist.core.histogram import Histogram
from dni_dist.core.numerics import read_number
from dni_dist.core.stage import Stage

Snapshot = dict[str, Any]

# Wall seconds a busy ratio is measured over at least (a snapshot right after another
# would otherwise divide by almost nothing).
_MIN_BUSY_WINDOW = 0.5


def _histogram(h: Histogram) -> dict[str, Any]:
    return {"bounds": list(h.bounds), "buckets": h.cumulative(), "sum": h.total}


class StageProbe:
    """Reads one stage (and its transport) into snapshots, from any thread.

    It reads counters the stage's own thread is updating without a lock: a snapshot may be a
    step behind, never wrong in kind, and the hot path pays nothing. Interval values (busy
    ratio, SG loss and cosine) are means since the previous snapshot.
    """

    def __init__(self, stage: Stage, batch_size: int) -> None:
        self.stage = stage
        self.batch_size = batch_size
        self._busy_ref = (time.perf_counter(), stage.stats.compute_seconds)
        self._busy_ratio = 0.0
        self._sg_ref = (0, 0.0, 0.0)
        self._sg: tuple[float | None, float | None] = (None, None)

    def snapshot(self, transport: Any = None) -> Snapshot:
        stats = self.stage.stats
        now, compute = time.perf_counter(), stats.compute_seconds
        wall0, compute0 = self._busy_ref
        if now - wall0 >= _MIN_BUSY_WINDOW:
            self._busy_ratio = min(1.0, max(0.0, (compute - compute0) / (now - wall0)))
            self._busy_ref = (now, compute)
        # Device sums: read back here, at poll time, never by the stage's own thread.
        n = stats.sg_updates - read_number(stats.sg_masked)
        loss_sum, cos_sum = read_number(stats.sg_loss_sum), read_number(stats.sg_cosine_sum)
        n0, loss0, cos0 = self._sg_ref
        if n > n0:
            self._sg = ((loss_sum - loss0) / (n - n0), (cos_sum - cos0) / (n - n0))
            self._sg_ref = (n, loss_sum, cos_sum)
        wire = transport.stats if transport is not None else None
        return {
            "stage": self.stage.index,
            "counters": {
                "steps": stats.steps,
                "samples": stats.steps * self.batch_size,
                "updates": stats.updates,
                "dropped_targets": stats.dropped_targets,
                # Counted once numeric-fault handling lands in StageStats; 0 until then.
                "nonfinite_steps": getattr(stats, "nonfinite_steps", 0),
                "sent_bytes": wire.bytes_sent if wire else 0,
                "received_bytes": wire.bytes_received if wire else 0,
                "sent_messages": wire.messages_sent if wire else 0,
                "received_messages": wire.messages_received if wire else 0,
            },
            "gauges": {
                "queue_depth": transport.queued if transport is not None else 0,
                "pending_steps": self.stage.pending_steps,
                "sg_loss": self._sg[0],
                "sg_cosine": self._sg[1],
                "busy_ratio": self._busy_ratio,
            },
            "histograms": {
                "step_seconds": _histogram(stats.step_seconds),
                "staleness_steps": _histogram(stats.staleness),
            },
        }
