"""The slow-link latency sweep (``dni-dist bench links``): well-formed output."""

from __future__ import annotations

import json

import pytest
from helpers import start_local_ray

from dni_dist.bench import links


@pytest.fixture(scope="module")
def ray_session():
    import ray

    start_local_ray()
    yield
    ray.shutdown()


def test_retained_is_the_10ms_throughput_over_the_0ms_one() -> None:
    results = [
        {"label": label, "segments": 2, "latency_s": lat, "samples_per_second": sps}
        for label in links.VARIANTS
        for lat, sps in ((0.0, 200.0), (0.01, 50.0))
    ]
    assert links._retained(results, [2]) == dict.fromkeys(links.VARIANTS, 0.25)
    assert set(links._retained(results, [2, 3])) == {f"{label} K={k}" for label in links.VARIANTS for k in (2, 3)}
    assert "| sg | 200 | 50 | 0.25 |" in links._markdown(
        {
            "setup": {**_setup(), "latencies_s": [0.0, 0.01]},
            "results": results,
            "retained": links._retained(results, [2]),
        },
        [2],
    )


def _setup() -> dict:
    return {"model": "m", "data": "d", "engine": "e", "bandwidth": 0.0, "cpus_per_stage": 1, "quick": True, "note": "n"}


@pytest.mark.slow
def test_a_quick_sweep_writes_well_formed_results(tmp_path, ray_session) -> None:
    latencies = [0.0, 0.01]  # two points of the sweep keep the test short; retained needs both
    payload = links.run(tmp_path, quick=True, segments=[2], latencies=latencies)
    on_disk = json.loads((tmp_path / "links.json").read_text())
    assert on_disk == payload
    assert "max_in_flight" in on_disk["setup"]["note"]
    results = on_disk["results"]
    assert len(results) == len(links.VARIANTS) * len(latencies)
    for r in results:
        assert {"method", "segments", "latency_s", "bandwidth", "samples_per_second"} <= r.keys()
        assert r["segments"] == 2 and r["samples_per_second"] > 0
    assert {(r["label"], r["latency_s"]) for r in results} == {(v, lat) for v in links.VARIANTS for lat in latencies}
    assert {r["method"] for r in results} == {"sg", "backprop"}
    assert {r["micro_batches"] for r in results if r["label"] == "gpipe-m4"} == {4}
    assert set(on_disk["retained"]) == set(links.VARIANTS)
    assert all(v > 0 for v in on_disk["retained"].values())
    assert (tmp_path / "links.png").stat().st_size > 0
    assert "gpipe-m4" in (tmp_path / "links.md").read_text()
