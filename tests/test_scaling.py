"""Waiting for a cluster to grow (engines/scaling.py) on an embedded Ray of 2 CPUs and no
GPU, which stands in for an autoscaling cluster that has not added its GPU nodes yet."""

from __future__ import annotations

import time

import pytest
import ray
from conftest import config
from helpers import start_local_ray, wait_for

from dni_dist.builder import load_data
from dni_dist.engines.ray_engine import RayRun
from dni_dist.engines.scaling import wait_for_placement
from dni_dist.errors import ConfigError


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    start_local_ray()
    yield
    ray.shutdown()


def test_stages_asking_for_gpus_the_cluster_lacks_wait_scale_timeout_then_one_line(capsys) -> None:
    # dist.timeout is long: the wait for the cluster to grow is dist.scale_timeout, not it.
    cfg = config("runtime=ray", "transport=gloo", "dist.device=cuda", "dist.scale_timeout=3", "dist.timeout=600")
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        RayRun(cfg, load_data(cfg))
    waited = time.monotonic() - started
    assert 3 <= waited < 60  # a bound against dist.timeout's 600 s, not a speed claim
    message = str(info.value)
    assert "\n" not in message and "short of GPU 2 (has 0)" in message and "dist.scale_timeout=3 s" in message
    err = capsys.readouterr().err
    progress = [line for line in err.splitlines() if line.startswith("dni-dist: waiting for the cluster")]
    assert progress and "short of GPU 2 (has 0)" in progress[0] and "of dist.scale_timeout=3" in progress[0]
    # The failed run gave its placement group back: the whole cluster is free again.
    assert wait_for(lambda: ray.available_resources().get("CPU") == 2.0)


def test_a_local_ray_the_run_started_itself_is_refused_at_once_it_cannot_grow(capsys) -> None:
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [{"CPU": 1.0, "GPU": 1.0}] * 2
    pg = placement_group(bundles, strategy="PACK")
    started = time.monotonic()
    try:
        with pytest.raises(ConfigError, match=r"need GPU 2 \(can have 0\): this local Ray cannot grow") as info:
            wait_for_placement(pg, bundles, "PACK", 600.0, 600.0, started_here=True)
    finally:
        remove_placement_group(pg)
    assert time.monotonic() - started < 10  # no wait at all, let alone a timeout's
    assert "\n" not in str(info.value) and "waiting" not in capsys.readouterr().err
