"""Where the Ray engine puts its stages: pure decisions, so they are tested without a cluster.

- A stage's GPU share: a whole GPU when there is one per stage; else stages share GPUs in
  equal whole-number groups, ``1 / ceil(K / gpus)`` each, so the shares always pack (3 GPUs
  for 4 stages: 1/2 each, two stages on each of two GPUs; ``gpus / K`` = 3/4 would leave every
  GPU with a quarter no other stage fits into).
- Which bundle each stage takes: neighbours exchange every step, so stages on one node are
  kept adjacent (the placement group decides the nodes, we decide the order of the ranks).
- gRPC on loopback cannot cross nodes: such a run stops at once, before any stage dials.
- An autoscaling cluster (min workers 0) has no GPU until something asks for one, so the
  GPU request comes from ``dist.device``/``dist.gpus_per_stage`` as well as from what the
  cluster has now. When the stages need more than the cluster has, the run waits for it to
  grow, up to ``dist.scale_timeout`` (``wait_limit``), unless the cluster is known not to
  grow that far (``check_ceiling``: our own local Ray, or a cluster whose node groups'
  maxima are published to Ray), which stops at once. Every refusal is one line naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from dni_dist.errors import ConfigError
from dni_dist.transports.addresses import is_loopback


def gpu_share(gpus: float, stages: int, transport: str) -> float:
    """Each stage's ``num_gpus``: 1, ``1/ceil(K/gpus)`` when GPUs are fewer, 0 without any.
    NCCL refuses two ranks on one GPU, so it needs one GPU per stage."""
    if gpus >= stages:
        return 1.0
    if transport == "nccl":
        raise ConfigError(
            f"transport=nccl needs one GPU per stage ({stages}), the cluster has {gpus:g}; use transport=gloo, "
            "or dist.device=cuda to wait for an autoscaling cluster to add GPUs"
        )
    if gpus <= 0:
        return 0.0
    if gpus < 1:  # a fraction of one GPU: split it evenly
        return gpus / stages
    return 1.0 / math.ceil(stages / math.floor(gpus))


def stage_gpus(device: str, gpus_per_stage: float, cluster_gpus: float, stages: int, transport: str) -> float:
    """Each stage's ``num_gpus`` for ``dist.device`` and ``dist.gpus_per_stage`` (0: derived).

    ``cpu``: none. An explicit share: that share. ``cuda``: the share of the GPUs the
    cluster has now, or a whole GPU each when it has none yet (or for NCCL, one GPU per
    rank): an autoscaler adds GPU nodes once the placement group asks for them. ``auto``:
    the share of the GPUs the cluster has now; none means CPU stages."""
    if device == "cpu":
        return 0.0
    if gpus_per_stage > 0:
        return gpus_per_stage
    if device == "cuda" and (cluster_gpus <= 0 or transport == "nccl"):
        return 1.0
    return gpu_share(cluster_gpus, stages, transport)


def stage_cpus(cpus_per_stage: float | None, cluster_cpus: float, stages: int, use_gpu: bool) -> float:
    """Each stage's ``num_cpus``: ``dist.cpus_per_stage``, else one (a GPU stage, or a
    cluster with no CPUs yet: a head node that runs no work, workers still to come), else
    an equal share of the cluster's CPUs, at most one."""
    if cpus_per_stage:
        return cpus_per_stage
    if use_gpu or cluster_cpus <= 0:
        return 1.0
    return min(1.0, cluster_cpus / stages)


Shortfall = dict[str, tuple[float, float]]  # resource -> (the stages need, the cluster has)


def shortfall(bundles: Sequence[Mapping[str, float]], have: Mapping[str, float]) -> Shortfall:
    """The resources that ``bundles`` need beyond ``have`` (the cluster's totals), in sum.
    Empty: the cluster could hold them now (though perhaps not yet free, or not per node)."""
    need: dict[str, float] = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            need[name] = need.get(name, 0.0) + amount
    return {name: (n, have.get(name, 0.0)) for name, n in need.items() if n > have.get(name, 0.0) + 1e-9}


def describe(short: Shortfall, has: str = "has") -> str:
    """``GPU 4 (has 0), CPU 4 (has 2)``."""
    return ", ".join(f"{name} {need:g} ({has} {there:g})" for name, (need, there) in sorted(short.items()))


def check_ceiling(bundles: Sequence[Mapping[str, float]], ceiling: Mapping[str, float] | None, why: str) -> None:
    """Stop at once, in one line, when the stages need more than the cluster can ever have
    (``ceiling``: its largest size, ``why`` it is that; None: not known, so wait)."""
    if ceiling is None:
        return
    beyond = shortfall(bundles, ceiling)
    if beyond:
        raise ConfigError(
            f"{len(bundles)} stages of {_brief(bundles[0])} need {describe(beyond, 'can have')}: {why}; "
            "lower segments or dist.gpus_per_stage, or set dist.device=cpu"
        )


def wait_limit(short: Shortfall, timeout: float, scale_timeout: float) -> tuple[float, str]:
    """(seconds to wait for the placement group, the key that sets them): the cluster has
    the resources already: ``dist.timeout`` (they may be busy); it must grow first:
    ``dist.scale_timeout``."""
    return (scale_timeout, "dist.scale_timeout") if short else (timeout, "dist.timeout")


def waiting_line(
    bundles: Sequence[Mapping[str, float]], short: Shortfall, waited: float, limit: float, key: str
) -> str:
    """A progress line while the placement group waits."""
    what = f"short of {describe(short)}" if short else "its resources are in use"
    return (
        f"dni-dist: waiting for the cluster to place {len(bundles)} stages of {_brief(bundles[0])}: {what}; "
        f"{waited:.0f} s of {key}={limit:g}"
    )


def placement_timeout(
    bundles: Sequence[Mapping[str, float]], strategy: str, short: Shortfall, limit: float, key: str
) -> ConfigError:
    """The one line when the placement group was not ready in time."""
    what = f": short of {describe(short)}" if short else ""
    fix = "raise dist.scale_timeout or add nodes" if short else "add nodes or lower segments"
    return ConfigError(
        f"the cluster did not place {len(bundles)} stages of {_brief(bundles[0])} ({strategy}) within "
        f"{key}={limit:g} s{what}; {fix}, or lower dist.gpus_per_stage or set dist.device=cpu"
    )


def _brief(bundle: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{name}: {amount:g}" for name, amount in bundle.items()) + "}"


def stage_bundles(bundle_nodes: Sequence[str]) -> list[int]:
    """The bundle for each stage (stage i takes bundle ``result[i]``), given each bundle's
    node: bundles grouped by node, nodes in the order they first appear, so that stage
    k and k+1 share a node wherever the placement allows."""
    order: dict[str, list[int]] = {}
    for bundle, node in enumerate(bundle_nodes):
        order.setdefault(node, []).append(bundle)
    return [bundle for bundles in order.values() for bundle in bundles]


def check_one_machine(transport: str, bundle_nodes: Sequence[str]) -> None:
    """Shared memory joins stages on one machine only: say so now, in one line."""
    nodes = len(set(bundle_nodes))
    if transport == "shm" and nodes > 1:
        raise ConfigError(
            f"transport=shm needs every stage on one machine, but the placement put them on {nodes} nodes; "
            "use transport=gloo (nccl between GPUs), or dist.placement=pack on a node with room for all"
        )


def check_grpc_reach(transport: str, bind: str, bundle_nodes: Sequence[str]) -> None:
    """A loopback gRPC server is unreachable from another node: say so now, in one line,
    not after the connect timeout."""
    nodes = len(set(bundle_nodes))
    if transport == "grpc" and nodes > 1 and is_loopback(bind):
        raise ConfigError(
            f"dist.grpc_bind={bind} is loopback but the stages are placed on {nodes} nodes, so they "
            "cannot reach each other; set dist.grpc_bind=0.0.0.0 with TLS (docs/reliability-and-security.md)"
        )
