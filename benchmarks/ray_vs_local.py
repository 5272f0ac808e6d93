"""Ray engine against the local engine, samples/s, in one process, epochs interleaved.

Digits default (method sg, K=2, batch 64, gloo, one CPU per actor). The engines run side
by side: the local engine (one torch thread, as each actor has), the Ray engine with its
stages unpinned (``dist.pin_cpus=off``) and pinned (``auto``: this script starts its own
Ray; ``--set KEY=VALUE`` adds settings to this engine only, e.g.
``dist.compute_nice_offset=0``). Only one run at a time can hold a core (pinning claims
them), so the pinned variants to compare run in separate invocations. Each epoch runs on
every engine in turn, so a change of load on a shared machine (this one's neighbours move
wall times by 10-20% from minute to minute) hits them alike; the first epoch of each is
left out. Samples/s is the median epoch's. ``--epochs N`` (default 12). Run it with
PYTHONPATH pointing at a checkout to compare two trees.
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray
import torch

from dni_dist.builder import load_data
from dni_dist.config import load_config
from dni_dist.engines.local_run import LocalRun
from dni_dist.engines.ray_engine import RayRun, start_local_ray

RAY = ["runtime=ray", "transport=gloo", "dist.cpus_per_stage=1"]
ENGINES = {
    "local": ["runtime=local"],
    "ray unpinned": [*RAY, "dist.pin_cpus=off"],
    "ray pinned": [*RAY, "dist.pin_cpus=auto"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for the pinned engine")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_local_ray(4)  # logical CPUs: the idle engine's actors keep theirs
    runs = {}
    try:
        for name, settings in ENGINES.items():
            extra = args.set if name == "ray pinned" else []
            cfg = load_config(overrides=["segments=2", "progress=off", *settings, *extra])
            data = load_data(cfg)
            runs[name] = (LocalRun if cfg.runtime == "local" else RayRun)(cfg, data)
        steps = len(data.x_train) // cfg.data.batch_size
        walls: dict[str, list[float]] = {name: [] for name in runs}
        for epoch in range(args.epochs):
            for name, run in runs.items():
                started = time.perf_counter()
                run.train_epoch(epoch)
                walls[name].append(time.perf_counter() - started)
        pinned = runs["ray pinned"].stage_summaries()[0]["cpu_affinity"]  # type: ignore[union-attr]
    finally:
        for run in runs.values():
            run.close()
        ray.shutdown()
    rates = {name: steps * cfg.data.batch_size / statistics.median(w[1:]) for name, w in walls.items()}
    local = rates["local"]
    shown = ", ".join(f"{name} {rate:.0f} ({rate / local:.2f}x)" for name, rate in rates.items())
    print(f"{args.label}: {shown}; stage 0 pinned to {pinned}")


if __name__ == "__main__":
    main()
