"""What the runner shows about a run while it runs: the metrics endpoint and the progress
display, fed by one background poller of the stages' snapshots.

The runner needs four calls: ``Monitor(...)``, ``with monitor.epoch(engine, epoch):``
around ``train_epoch``, ``monitor.epoch_end(record)`` and ``monitor.close()``. An engine
that has ``snapshots()`` (one plain-data snapshot per stage, see metrics.StageProbe) is
polled every ``POLL_SECONDS`` during the epoch and once at its end; one without is
reported per epoch only. Checkpoint and restart code counts into ``monitor.job``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from dni_dist.config import TrainConfig
from dni_dist.operations.metrics import JobMetrics, MetricsHub, MetricsServer, Snapshot
from dni_dist.operations.progress import Progress

POLL_SECONDS = 1.0

log = logging.getLogger(__name__)


class Monitor:
    def __init__(self, config: TrainConfig, steps_per_epoch: int, verbose: bool, addr: str = "0.0.0.0") -> None:
        transport = config.transport if config.runtime == "ray" else "local"
        self.hub = MetricsHub(config.method, transport)
        self.server = MetricsServer(self.hub, config.metrics_port, addr) if config.metrics_port else None
        mode = config.progress if verbose else "off"  # --quiet (verbose=False) means no progress
        self.progress = Progress(mode, config.epochs, steps_per_epoch, config.data.batch_size)

    @property
    def job(self) -> JobMetrics:
        return self.hub.job

    @contextlib.contextmanager
    def epoch(self, engine: Any, epoch: int) -> Iterator[None]:
        """Poll ``engine`` while the body (one ``train_epoch``) runs."""
        first_step = int(engine.step)
        self.progress.begin_epoch(epoch, first_step)
        source = getattr(engine, "snapshots", None)
        live = source is not None and (self.server is not None or self.progress.mode != "off")
        if not live:
            yield
            return
        if hasattr(engine, "snapshot_with_epochs"):  # the last poll rides on the epoch's results
            engine.snapshot_with_epochs = True
        base = self._top_steps(_safe(source))  # the top stage's step count as the epoch starts

        def publish(snaps: list[Snapshot]) -> None:
            self.hub.update(snaps)
            if base is not None and (top := self._top_steps(snaps)) is not None:
                done = first_step + max(0, top - base)
                self.job.steps = max(self.job.steps, done)
                self.progress.steps(done, epoch)

        poller = _Poller(source, publish, POLL_SECONDS)
        poller.start()
        try:
            yield
        except BaseException:
            poller.stop(final=False)  # a failed or interrupted epoch: no last poll of its stages
            raise
        poller.stop()

    def epoch_end(self, record: dict[str, Any]) -> None:
        self.job.record_epoch(record)
        self.progress.epoch(record)

    def close(self) -> None:
        self.progress.close()
        if self.server is not None:
            self.server.stop()
            self.server = None

    @staticmethod
    def _top_steps(snaps: list[Snapshot] | None) -> int | None:
        if not snaps:
            return None
        return max(snaps, key=lambda s: s["stage"])["counters"]["steps"]


def _safe(source: Callable[[], list[Snapshot]]) -> list[Snapshot] | None:
    """A poll that fails (a stage died or is restarting) is skipped: monitoring never ends a run."""
    try:
        return source()
    except Exception as exc:  # any failure of a poll means "no data this time"
        log.debug("metrics poll failed: %r", exc)
        return None


class _Poller:
    """Calls ``source`` every ``interval`` seconds in a daemon thread, and once more at stop."""

    def __init__(self, source: Callable[[], list[Snapshot]], sink: Callable[[list[Snapshot]], None], interval: float):
        self.source = source
        self.sink = sink
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, final: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if final:
            self._poll()  # the epoch's final counts, taken after the stages stopped

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def _poll(self) -> None:
        snaps = _safe(self.source)
        if snaps:
            self.sink(snaps)
