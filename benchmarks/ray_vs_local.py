"""Ray engine against the local engine, samples/s, in one process.

Digits default (method sg, K=2), 8 epochs each, the runs' own ``samples_per_second``
(summary.json). Run it with PYTHONPATH pointing at a checkout to compare two trees, e.g.
``PYTHONPATH=/path/to/old python benchmarks/ray_vs_local.py old`` then the same for the
new tree, alternating, on a quiet machine.
"""

from __future__ import annotations

import sys

import ray
import torch

from dni_dist.config import load_config
from dni_dist.runner import train


def main(label: str) -> None:
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rates = {}
    for runtime in ("local", "ray"):
        overrides = ["epochs=8", "segments=2", f"runtime={runtime}", "progress=off", f"out=runs/ray-vs-local-{runtime}"]
        if runtime == "ray":
            overrides += ["transport=gloo", "dist.cpus_per_stage=1"]
        rates[runtime] = train(load_config(overrides=overrides), verbose=False)["samples_per_second"]
    ray.shutdown()
    ratio = rates["ray"] / rates["local"]
    print(f"{label}: local {rates['local']:.0f} samples/s, ray {rates['ray']:.0f} samples/s, ray/local {ratio:.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "this tree")
