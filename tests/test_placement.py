"""Placement decisions of the Ray engine (engines/placement.py), without a cluster."""

from __future__ import annotations

import itertools

import pytest

from dni_dist.engines.placement import check_grpc_reach, gpu_share, stage_bundles
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
