"""Waiting for the stages' placement group: an autoscaling cluster grows while we wait.

The decisions (how long, what to say) are engines/placement.py's; this module asks Ray.
A cluster that must grow first gets ``dist.scale_timeout`` and a progress line on stderr
every ``PROGRESS_EVERY`` seconds (what is short, how long so far), so a user watching
``ray job logs`` sees why nothing starts yet. One that is known never to grow far enough
is refused at once.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import ray

from dni_dist.engines.placement import check_ceiling, placement_timeout, shortfall, wait_limit, waiting_line

PROGRESS_EVERY = 10.0  # seconds between progress lines
QUIET_WAIT = 1.0  # a group ready within this says nothing


def cluster_ceiling(started_here: bool) -> tuple[dict[str, float] | None, str]:
    """(the most of each resource the cluster can ever have, why), or (None, "") when not
    known. Our own local Ray cannot grow. A cluster whose node groups are published to
    Ray's GCS gives their maxima (the check Ray Train makes before it waits for its own
    placement group); Ray exposes them only through a private call, so any failure there,
    or nothing published, means "not known" and the caller waits."""
    if started_here:
        return dict(ray.cluster_resources()), "this local Ray cannot grow (dist.address joins a cluster)"
    try:
        from ray._private import state

        most = state.state.get_max_resources_from_cluster_config()
    except Exception:  # a private API: absent or changed in another Ray
        return None, ""
    if not most:
        return None, ""
    return {name: float(amount) for name, amount in most.items()}, "the most its autoscaler's node groups can reach"


def wait_for_placement(
    pg: Any,
    bundles: Sequence[Mapping[str, float]],
    strategy: str,
    timeout: float,
    scale_timeout: float,
    started_here: bool,
    out: TextIO | None = None,
) -> None:
    """Return once ``pg`` is ready; raise ConfigError (one line) when it cannot be or was
    not in time."""
    out = out or sys.stderr
    ceiling, why = cluster_ceiling(started_here)
    check_ceiling(bundles, ceiling, why)
    started = time.monotonic()
    short = shortfall(bundles, ray.cluster_resources())
    limit, key = wait_limit(short, timeout, scale_timeout)
    ready_ref = pg.ready()
    step = QUIET_WAIT
    while True:
        waited = time.monotonic() - started
        if waited >= limit:
            raise placement_timeout(bundles, strategy, short, limit, key)
        ready, _ = ray.wait([ready_ref], timeout=min(step, limit - waited))
        if ready:
            return
        short = shortfall(bundles, ray.cluster_resources())  # nodes may have joined (or left)
        print(waiting_line(bundles, short, time.monotonic() - started, limit, key), file=out, flush=True)
        step = PROGRESS_EVERY
