"""Prometheus metrics: one endpoint per job, on the driver.

Stages never talk to Prometheus. Each stage hands out a plain-data *snapshot* (a dict of
numbers, cheap to pickle across a Ray call) from ``core.probe.StageProbe.snapshot``; the driver keeps
the latest snapshot of every stage plus the job-level values in a ``MetricsHub``, and a
custom collector turns those into metric families when Prometheus scrapes. One endpoint
per job is what the research notes recommend: prometheus_client in every actor would need
a port per process and has no cross-node multiprocess mode.

Names and labels are a shared contract (BRIEF.md; the dashboard relies on them): per stage
``stage``, ``method``, ``transport``; job-level metrics ``method``, ``transport``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from dni_dist.core.probe import Snapshot
from dni_dist.errors import ConfigError

# (metric name, snapshot key, help). Counter names end in _total as exposed.
STAGE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("dni_stage_steps_total", "steps", "Steps whose input this stage has processed."),
    ("dni_stage_samples_total", "samples", "Samples this stage has processed (steps x batch size)."),
    ("dni_stage_updates_total", "updates", "Optimiser steps of this stage's segment."),
    (
        "dni_stage_dropped_targets_total",
        "dropped_targets",
        "Gradients or SG targets that came too late and were dropped.",
    ),
    (
        "dni_stage_nonfinite_steps_total",
        "nonfinite_steps",
        "Steps skipped for a non-finite loss, activation or gradient.",
    ),
    ("dni_transport_sent_bytes_total", "sent_bytes", "Bytes this stage sent (payload, labels, header)."),
    ("dni_transport_received_bytes_total", "received_bytes", "Bytes this stage received."),
    ("dni_transport_sent_messages_total", "sent_messages", "Messages this stage sent."),
    ("dni_transport_received_messages_total", "received_messages", "Messages this stage received."),
)
STAGE_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("dni_stage_queue_depth", "queue_depth", "Messages waiting in this stage's transport queues."),
    ("dni_stage_pending_steps", "pending_steps", "Steps this stage keeps while waiting for their targets."),
    ("dni_stage_sg_loss", "sg_loss", "Mean synthetic-gradient loss since the previous snapshot."),
    ("dni_stage_sg_cosine", "sg_cosine", "Mean cosine of SG prediction and target since the previous snapshot."),
    ("dni_stage_busy_ratio", "busy_ratio", "Compute seconds per wall second over the last interval."),
)
STAGE_HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("dni_stage_step_seconds", "step_seconds", "Compute seconds per completed step at this stage."),
    ("dni_stage_staleness_steps", "staleness_steps", "Steps between a step's forward pass and its SG target."),
)
JOB_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("dni_job_epoch", "epoch", "Epochs completed."),
    ("dni_job_train_loss", "train_loss", "Mean training loss of the last epoch."),
    ("dni_job_test_accuracy", "test_accuracy", "Test accuracy after the last epoch (0..1)."),
    ("dni_job_test_loss", "test_loss", "Test loss after the last epoch."),
    ("dni_job_samples_per_second", "samples_per_second", "Training samples per second so far."),
)
JOB_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("dni_job_steps_total", "steps", "Training steps completed."),
    ("dni_job_restarts_total", "restarts", "Times the driver restarted failed stages."),
    ("dni_job_redone_steps_total", "redone_steps", "Steps trained again after restarting from a checkpoint."),
    ("dni_job_checkpoints_total", "checkpoints", "Checkpoints written."),
)
METRIC_NAMES: tuple[str, ...] = tuple(
    name for table in (STAGE_COUNTERS, STAGE_GAUGES, STAGE_HISTOGRAMS, JOB_GAUGES, JOB_COUNTERS) for name, _, _ in table
)


@dataclass
class JobMetrics:
    """Job-level values; the runner sets them per epoch, checkpoint and restart code counts."""

    epoch: int = 0
    train_loss: float | None = None
    test_accuracy: float | None = None
    test_loss: float | None = None
    samples_per_second: float | None = None
    steps: int = 0
    restarts: int = 0
    redone_steps: int = 0
    checkpoints: int = 0

    def record_epoch(self, record: dict[str, Any]) -> None:
        """An epoch record as the runner writes it to metrics.jsonl."""
        self.epoch = int(record["epoch"])
        self.steps = max(self.steps, int(record["step"]))
        for key in ("train_loss", "test_accuracy", "test_loss", "samples_per_second"):
            if record.get(key) is not None:
                setattr(self, key, float(record[key]))

    def record_restart(self, redone_steps: int = 0) -> None:
        self.restarts += 1
        self.redone_steps += redone_steps

    def record_checkpoint(self) -> None:
        self.checkpoints += 1


class MetricsHub:
    """The driver's latest view of the job: one snapshot per stage plus ``job``."""

    def __init__(self, method: str, transport: str) -> None:
        self.method = method
        self.transport = transport
        self.job = JobMetrics()
        self._stages: dict[int, Snapshot] = {}
        self._lock = threading.Lock()

    def update(self, snapshots: list[Snapshot]) -> None:
        with self._lock:
            for snap in snapshots:
                self._stages[snap["stage"]] = snap

    def stages(self) -> list[Snapshot]:
        with self._lock:
            return [self._stages[k] for k in sorted(self._stages)]


class HubCollector(Collector):
    """Builds every metric family from the hub at scrape time."""

    def __init__(self, hub: MetricsHub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Any]:
        hub = self.hub
        stages = hub.stages()
        stage_labels = ["stage", "method", "transport"]

        def values(snap: Snapshot) -> list[str]:
            return [str(snap["stage"]), hub.method, hub.transport]

        for name, key, doc in STAGE_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=stage_labels)
            for snap in stages:
                family.add_metric(values(snap), snap["counters"][key])
            yield family
        for name, key, doc in STAGE_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=stage_labels)
            for snap in stages:
                if snap["gauges"][key] is not None:
                    family.add_metric(values(snap), snap["gauges"][key])
            yield family
        for name, key, doc in STAGE_HISTOGRAMS:
            family = HistogramMetricFamily(name, doc, labels=stage_labels)
            for snap in stages:
                h = snap["histograms"][key]
                les = [_le(b) for b in h["bounds"]] + ["+Inf"]
                family.add_metric(values(snap), list(zip(les, h["buckets"], strict=True)), h["sum"])
            yield family
        job_labels = [hub.method, hub.transport]
        job = hub.job
        for name, key, doc in JOB_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["method", "transport"])
            if getattr(job, key) is not None:  # absent until the first epoch has a value
                family.add_metric(job_labels, getattr(job, key))
            yield family
        for name, key, doc in JOB_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["method", "transport"])
            family.add_metric(job_labels, getattr(job, key))
            yield family


def _le(bound: float) -> str:
    return str(float(bound))


class MetricsServer:
    """``/metrics`` over HTTP from a private registry (nothing process-global is exported)."""

    def __init__(self, hub: MetricsHub, port: int, addr: str = "0.0.0.0") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(HubCollector(hub))
        try:
            self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"metrics_port={port} cannot be served on {addr}: {exc.strerror or exc}") from None
        self.port = self._server.server_port

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
