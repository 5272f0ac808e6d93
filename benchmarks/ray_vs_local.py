"""Ray engine against the local engine, samples/s, in one process.

Digits default (method sg, K=2), 8 epochs each, the runs' own ``samples_per_second``
(summary.json): the local engine, then the Ray engine with its stages unpinned
(``dist.pin_cpus=off``) and pinned (``auto``: this script starts its own Ray, so the stages
get a core each). Run it with PYTHONPATH pointing at a checkout to compare two trees, e.g.
``PYTHONPATH=/path/to/old python benchmarks/ray_vs_local.py old`` then the same for the
new tree, alternating, on a quiet machine.
"""

from __future__ import annotations

import sys

import ray
import torch

from dni_dist.config import load_config
from dni_dist.engines.ray_engine import start_local_ray
from dni_dist.runner import train

RUNS = {
    "local": ["runtime=local"],
    "ray unpinned": ["runtime=ray", "transport=gloo", "dist.cpus_per_stage=1", "dist.pin_cpus=off"],
    "ray pinned": ["runtime=ray", "transport=gloo", "dist.cpus_per_stage=1", "dist.pin_cpus=auto"],
}


def main(label: str) -> None:
    torch.set_num_threads(1)
    start_local_ray(2)
    rates = {}
    for name, settings in RUNS.items():
        overrides = ["epochs=8", "segments=2", "progress=off", f"out=runs/ray-vs-local-{name.replace(' ', '-')}"]
        rates[name] = train(load_config(overrides=[*overrides, *settings]), verbose=False)["samples_per_second"]
    ray.shutdown()
    local = rates.pop("local")
    ratios = ", ".join(f"{name} {rate:.0f} ({rate / local:.2f}x)" for name, rate in rates.items())
    print(f"{label}: local {local:.0f} samples/s, {ratios}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "this tree")
