"""The Prometheus endpoint: names and labels of the shared contract, live values, cleanup.

The local runs scrape at each epoch end (deterministic); the Ray run is scraped from the
test thread while training runs in another, in this module's own Ray session.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
import urllib.request

import pytest
from conftest import config
from helpers import start_local_ray
from prometheus_client.parser import text_string_to_metric_families

from dni_dist.core.histogram import Histogram
from dni_dist.errors import ConfigError
from dni_dist.operations import monitor as monitor_module
from dni_dist.operations.metrics import METRIC_NAMES, MetricsHub, MetricsServer
from dni_dist.runner import train

# The contract in BRIEF.md, spelled out: the dashboard queries exactly these.
CONTRACT = {
    "dni_stage_steps_total": "counter",
    "dni_stage_samples_total": "counter",
    "dni_stage_updates_total": "counter",
    "dni_stage_step_seconds": "histogram",
    "dni_stage_staleness_steps": "histogram",
    "dni_stage_queue_depth": "gauge",
    "dni_stage_pending_steps": "gauge",
    "dni_stage_sg_loss": "gauge",
    "dni_stage_sg_cosine": "gauge",
    "dni_stage_dropped_targets_total": "counter",
    "dni_stage_nonfinite_steps_total": "counter",
    "dni_stage_busy_ratio": "gauge",
    "dni_transport_sent_bytes_total": "counter",
    "dni_transport_received_bytes_total": "counter",
    "dni_transport_sent_messages_total": "counter",
    "dni_transport_received_messages_total": "counter",
    "dni_job_epoch": "gauge",
    "dni_job_train_loss": "gauge",
    "dni_job_test_accuracy": "gauge",
    "dni_job_test_loss": "gauge",
    "dni_job_samples_per_second": "gauge",
    "dni_job_steps_total": "counter",
    "dni_job_restarts_total": "counter",
    "dni_job_redone_steps_total": "counter",
    "dni_job_checkpoints_total": "counter",
}
SGD = ("method=sg", "segments=3", "sg.target=true", "sg.kind=linear", "data.batch_size=64")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, list]:
    """{sample name: [(labels, value), ...]} of one scrape."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def _types(port: int) -> dict[str, str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def _by_stage(samples: dict[str, list], name: str) -> dict[str, float]:
    return {labels["stage"]: value for labels, value in samples.get(name, [])}


def _train_scraping_each_epoch(monkeypatch, tmp_path, *overrides: str) -> tuple[list[tuple[dict, dict]], dict]:
    """Train locally; scrape just before and just after each epoch's job values land.
    Returns those scrapes and the metric families' types."""
    port = _free_port()
    scrapes: list[tuple[dict, dict]] = []
    types: dict[str, str] = {}
    original = monitor_module.Monitor.epoch_end

    def epoch_end(self, record):
        before = _scrape(port)
        original(self, record)
        scrapes.append((before, _scrape(port)))
        types.update(_types(port))

    monkeypatch.setattr(monitor_module.Monitor, "epoch_end", epoch_end)
    train(config(*overrides, f"metrics_port={port}", f"out={tmp_path}"))
    return scrapes, types


def test_a_local_run_exports_every_contract_name_with_its_type_and_labels(monkeypatch, tmp_path) -> None:
    assert set(METRIC_NAMES) == set(CONTRACT)
    [(_, after)], types = _train_scraping_each_epoch(monkeypatch, tmp_path, *SGD, "epochs=1")
    for name, kind in CONTRACT.items():
        family = name.removesuffix("_total") if kind == "counter" else name
        assert types.get(family) == kind, name
        sample = name + "_count" if kind == "histogram" else name
        assert after.get(sample), f"{sample} has no samples"
        for labels, _ in after[sample]:
            assert labels["method"] == "sg" and labels["transport"] == "local"
            if name.startswith(("dni_stage_", "dni_transport_")):
                assert labels["stage"] in {"0", "1", "2"}
    assert set(_by_stage(after, "dni_stage_steps_total")) == {"0", "1", "2"}


def test_counters_grow_per_epoch_and_job_values_appear_after_an_epoch(monkeypatch, tmp_path) -> None:
    [(before1, after1), (_, after2)], _ = _train_scraping_each_epoch(monkeypatch, tmp_path, *SGD, "epochs=2")
    steps_per_epoch = 1347 // 64
    assert "dni_job_test_accuracy" not in before1  # nothing evaluated yet
    [(_, accuracy)] = after1["dni_job_test_accuracy"]
    assert 0.0 < accuracy <= 1.0
    assert after1["dni_job_epoch"][0][1] == 1 and after2["dni_job_epoch"][0][1] == 2
    assert after2["dni_job_steps_total"][0][1] == 2 * steps_per_epoch
    for stage, steps in _by_stage(after2, "dni_stage_steps_total").items():
        assert steps == 2 * steps_per_epoch and _by_stage(after1, "dni_stage_steps_total")[stage] == steps_per_epoch
        assert _by_stage(after2, "dni_stage_samples_total")[stage] == steps * 64
    # SG stages trained their SG on every step with targets at most max_in_flight old
    staleness = _by_stage(after2, "dni_stage_staleness_steps_count")
    assert staleness["0"] == staleness["1"] == 2 * steps_per_epoch and staleness["2"] == 0
    # lockstep completes every step at every stage, so each one's compute time was recorded
    assert set(_by_stage(after2, "dni_stage_step_seconds_count").values()) == {2 * steps_per_epoch}
    _assert_cumulative(after2, "dni_stage_step_seconds")
    _assert_cumulative(after2, "dni_stage_staleness_steps")


def _assert_cumulative(samples: dict[str, list], name: str) -> None:
    counts = _by_stage(samples, name + "_count")
    for stage, count in counts.items():
        buckets = [(float(lb["le"]), v) for lb, v in samples[name + "_bucket"] if lb["stage"] == stage]
        bounds = [b for b, _ in buckets]
        values = [v for _, v in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == float("inf")
        assert values == sorted(values), f"{name} buckets of stage {stage} are not cumulative"
        assert values[-1] == count


def test_restarts_and_checkpoints_are_counted_for_the_scrape() -> None:
    hub = MetricsHub("sg", "gloo")
    server = MetricsServer(hub, 0, "127.0.0.1")  # port 0: any free port (tests only)
    try:
        hub.job.record_restart(redone_steps=7)
        hub.job.record_checkpoint()
        hub.job.record_checkpoint()
        got = _scrape(server.port)
    finally:
        server.stop()
    value = {name: got[name][0][1] for name in ("dni_job_restarts_total", "dni_job_redone_steps_total")}
    assert value == {"dni_job_restarts_total": 1, "dni_job_redone_steps_total": 7}
    assert got["dni_job_checkpoints_total"] == [({"method": "sg", "transport": "gloo"}, 2.0)]


def test_a_taken_port_is_a_config_error_naming_it(tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"metrics_port={port}"):
            train(config("epochs=1", f"metrics_port={port}", f"out={tmp_path}"))


def test_the_endpoint_closes_with_the_run(tmp_path) -> None:
    port = _free_port()
    train(config("method=backprop", "epochs=1", f"metrics_port={port}", f"out={tmp_path}"))
    with pytest.raises(OSError):
        _scrape(port)


def test_histogram_buckets() -> None:
    h = Histogram((1.0, 2.0, 4.0))
    for v in (0.5, 1.0, 1.5, 3.0, 9.0):
        h.observe(v)
    assert h.cumulative() == [2, 3, 4, 5] and h.count == 5 and h.total == 15.0
    with pytest.raises(ValueError, match="increase"):
        Histogram((2.0, 1.0))


# ------------------------------------------------------------------- Ray, live
@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    start_local_ray()
    yield
    ray.shutdown()


@pytest.mark.slow
def test_a_ray_run_is_scraped_live_while_it_trains(ray_session, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(monitor_module, "POLL_SECONDS", 0.2)
    port = _free_port()
    cfg = config(
        "runtime=ray",
        "transport=gloo",
        "dist.cpus_per_stage=0.5",
        "method=sg",
        "segments=2",
        "epochs=3",
        "dist.slow_stage=1",
        "dist.slow_seconds=0.05",  # about a second per epoch: time for several scrapes
        f"metrics_port={port}",
        f"out={tmp_path}",
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            train(cfg)
        except BaseException as exc:  # surfaced in the test thread below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    live: list[dict[str, list]] = []  # scrapes with stage values taken before the last epoch ended
    try:
        while thread.is_alive():
            try:
                samples = _scrape(port)
            except OSError:  # not serving yet, or already closed
                samples = {}
            epoch = samples.get("dni_job_epoch", [({}, 0)])[0][1]
            if "dni_stage_steps_total" in samples and epoch < cfg.epochs:
                live.append(samples)
            time.sleep(0.1)
    finally:
        thread.join()
    assert not errors, errors
    steps = [_by_stage(s, "dni_stage_steps_total") for s in live]
    assert len(steps) >= 2
    assert set(steps[-1]) == {"0", "1"}
    assert any(later["0"] > earlier["0"] for earlier, later in itertools.pairwise(steps)), steps
    last = live[-1]
    assert {lb["transport"] for lb, _ in last["dni_stage_queue_depth"]} == {"gloo"}
    assert _by_stage(last, "dni_transport_sent_bytes_total")["0"] > 0
    assert _by_stage(last, "dni_stage_busy_ratio")["1"] > 0  # the slowed stage is busy
    _assert_cumulative(last, "dni_stage_step_seconds")
