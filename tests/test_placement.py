"""Placement decisions of the Ray engine (engines/placement.py), without a cluster."""

from __future__ import annotations

import itertools

import pytest

from dni_dist.engines.placement import (
    check_ceiling,
    check_grpc_reach,
    gpu_share,
    placement_timeout,
    shortfall,
    stage_bundles,
    stage_cpus,
    stage_gpus,
    wait_limit,
    waiting_line,
)
from dni_dist.errors import ConfigError


@pytest.mark.parametrize(
    ("gpus", "stages", "share"),
    [(4, 4, 1.0), (8, 4, 1.0), (2, 4, 0.5), (3, 4, 0.5), (1, 3, 1 / 3), (3, 8, 1 / 3), (0, 4, 0.0)],
)
def test_a_stage_gets_a_share_that_packs_whole_gpus(gpus: float, stages: int, share: float) -> None:
    got = gpu_share(gpus, stages, "gloo")
    assert got == pytest.approx(share)
    if got:  # the shares fill whole GPUs: 1/share stages per GPU, and they all fit
        per_gpu = round(1 / got)
        assert per_gpu * got == pytest.approx(1.0)
        assert -(-stages // per_gpu) <= gpus


def test_nccl_with_fewer_gpus_than_stages_is_one_line() -> None:
    with pytest.raises(ConfigError, match="transport=nccl needs one GPU per stage") as info:
        gpu_share(3, 4, "nccl")
    assert "\n" not in str(info.value)


def test_neighbouring_stages_share_a_node_whatever_bundle_order_ray_chose() -> None:
    # Ray put bundles 0 and 2 on node a, 1 and 3 on node b: stages 0,1 -> a and 2,3 -> b.
    bundles = stage_bundles(["a", "b", "a", "b"])
    assert bundles == [0, 2, 1, 3]
    nodes = [["a", "b", "a", "b"][b] for b in bundles]
    assert sum(x != y for x, y in itertools.pairwise(nodes)) == 1  # one cross-node link, not three
    assert stage_bundles(["n"] * 4) == [0, 1, 2, 3]


def test_grpc_on_loopback_across_nodes_stops_at_once_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"dist\.grpc_bind=127\.0\.0\.1 is loopback") as info:
        check_grpc_reach("grpc", "127.0.0.1", ["a", "b"])
    assert "\n" not in str(info.value)
    check_grpc_reach("grpc", "127.0.0.1", ["a", "a"])  # one node: loopback is right
    check_grpc_reach("grpc", "0.0.0.0", ["a", "b"])
    check_grpc_reach("gloo", "127.0.0.1", ["a", "b"])  # gloo finds rank 0 by the node address


@pytest.mark.parametrize(
    ("device", "asked", "cluster_gpus", "transport", "share"),
    [
        ("auto", 0.0, 0, "gloo", 0.0),  # no GPU now: CPU stages, as before
        ("auto", 0.0, 2, "gloo", 0.5),
        ("cuda", 0.0, 0, "gloo", 1.0),  # an autoscaling cluster with no GPU node yet: ask for one each
        ("cuda", 0.0, 2, "gloo", 0.5),  # GPUs there: the packing share
        ("cuda", 0.0, 2, "nccl", 1.0),  # NCCL: a GPU per rank, the cluster may grow to it
        ("cuda", 0.25, 0, "gloo", 0.25),  # told
        ("auto", 0.5, 0, "gloo", 0.5),
        ("cpu", 0.0, 8, "gloo", 0.0),
    ],
)
def test_the_gpu_request_follows_dist_device_not_only_what_the_cluster_has_now(
    device: str, asked: float, cluster_gpus: float, transport: str, share: float
) -> None:
    assert stage_gpus(device, asked, cluster_gpus, 4, transport) == pytest.approx(share)


def test_a_cluster_without_cpus_yet_still_asks_for_a_cpu_per_stage() -> None:
    assert stage_cpus(None, 0, 4, use_gpu=False) == 1.0  # a CPU-less head: workers to come
    assert stage_cpus(None, 2, 4, use_gpu=False) == 0.5
    assert stage_cpus(None, 64, 4, use_gpu=True) == 1.0
    assert stage_cpus(0.25, 0, 4, use_gpu=True) == 0.25


def test_the_wait_is_the_scale_timeout_only_when_the_cluster_must_grow() -> None:
    bundles = [{"CPU": 1.0, "GPU": 1.0}] * 4
    short = shortfall(bundles, {"CPU": 2.0})
    assert short == {"CPU": (4.0, 2.0), "GPU": (4.0, 0.0)}
    assert wait_limit(short, 300.0, 900.0) == (900.0, "dist.scale_timeout")
    assert shortfall(bundles, {"CPU": 8.0, "GPU": 4.0}) == {}
    assert wait_limit({}, 300.0, 900.0) == (300.0, "dist.timeout")  # there, perhaps busy


def test_what_is_pending_and_the_key_to_raise_are_one_line_each() -> None:
    bundles = [{"CPU": 1.0, "GPU": 1.0}] * 2
    short = shortfall(bundles, {"CPU": 2.0})
    line = waiting_line(bundles, short, 20.4, 600.0, "dist.scale_timeout")
    assert line == (
        "dni-dist: waiting for the cluster to place 2 stages of {CPU: 1, GPU: 1}: short of GPU 2 (has 0); "
        "20 s of dist.scale_timeout=600"
    )
    error = str(placement_timeout(bundles, "PACK", short, 600.0, "dist.scale_timeout"))
    assert "\n" not in error and "GPU 2 (has 0)" in error and "dist.scale_timeout=600 s" in error
    assert "raise dist.scale_timeout" in error


def test_a_cluster_that_can_never_hold_the_stages_is_refused_at_once() -> None:
    bundles = [{"CPU": 1.0, "GPU": 1.0}] * 4
    check_ceiling(bundles, None, "")  # not known: wait instead
    check_ceiling(bundles, {"CPU": 64.0, "GPU": 8.0}, "its node groups")  # it can grow that far
    with pytest.raises(ConfigError, match=r"need GPU 4 \(can have 2\): its node groups") as info:
        check_ceiling(bundles, {"CPU": 64.0, "GPU": 2.0}, "its node groups")
    assert "\n" not in str(info.value) and "dist.device=cpu" in str(info.value)
