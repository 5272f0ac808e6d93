"""Where the Ray engine puts its stages: pure decisions, so they are tested without a cluster.

- A stage's GPU share: a whole GPU when there is one per stage; else stages share GPUs in
  equal whole-number groups, ``1 / ceil(K / gpus)`` each, so the shares always pack (3 GPUs
  for 4 stages: 1/2 each, two stages on each of two GPUs; ``gpus / K`` = 3/4 would leave every
  GPU with a quarter no other stage fits into).
- Which bundle each stage takes: neighbours exchange every step, so stages on one node are
  kept adjacent (the placement group decides the nodes, we decide the order of the ranks).
- gRPC on loopback cannot cross nodes: such a run stops at once, before any stage dials.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dni_dist.errors import ConfigError
from dni_dist.transports.addresses import is_loopback


def gpu_share(gpus: float, stages: int, transport: str) -> float:
    """Each stage's ``num_gpus``: 1, ``1/ceil(K/gpus)`` when GPUs are fewer, 0 without any.
    NCCL refuses two ranks on one GPU, so it needs one GPU per stage."""
    if gpus >= stages:
        return 1.0
    if transport == "nccl":
        raise ConfigError(
            f"transport=nccl needs one GPU per stage ({stages}), the cluster has {gpus:g}; use transport=gloo"
        )
    if gpus <= 0:
        return 0.0
    if gpus < 1:  # a fraction of one GPU: split it evenly
        return gpus / stages
    return 1.0 / math.ceil(stages / math.floor(gpus))


def stage_bundles(bundle_nodes: Sequence[str]) -> list[int]:
    """The bundle for each stage (stage i takes bundle ``result[i]``), given each bundle's
    node: bundles grouped by node, nodes in the order they first appear, so that stage
    k and k+1 share a node wherever the placement allows."""
    order: dict[str, list[int]] = {}
    for bundle, node in enumerate(bundle_nodes):
        order.setdefault(node, []).append(bundle)
    return [bundle for bundles in order.values() for bundle in bundles]


def check_grpc_reach(transport: str, bind: str, bundle_nodes: Sequence[str]) -> None:
    """A loopback gRPC server is unreachable from another node: say so now, in one line,
    not after the connect timeout."""
    nodes = len(set(bundle_nodes))
    if transport == "grpc" and nodes > 1 and is_loopback(bind):
        raise ConfigError(
            f"dist.grpc_bind={bind} is loopback but the stages are placed on {nodes} nodes, so they "
            "cannot reach each other; set dist.grpc_bind=0.0.0.0 with TLS (docs/reliability-and-security.md)"
        )
