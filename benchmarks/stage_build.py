"""What a Ray stage actor pays to build its stage: seconds and the process's peak RSS for
``build_stages(only=last)``, as StageWorker calls it, for two trees side by side.

Each measurement runs in a fresh Python process (peak RSS is per process), with
PYTHONPATH set to the tree under test; the trees alternate, ``--repeats`` times each:

    python benchmarks/stage_build.py --trees old=/path/to/main new=/path/to/branch

Defaults: an MLP of width 4096 and depth 8 (about 135M parameters) on digits, K=4, method
sg; ``--set`` overrides any config key (e.g. a transformer on ``data.name=text``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# Runs in the child: build the last stage alone and report (seconds, peak RSS in MiB).
CHILD = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
import dni_dist
from dni_dist.builder import build_stages, load_data
from dni_dist.config import load_config
config = load_config(overrides=json.loads(sys.argv[1]))
data = load_data(config)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
started = time.perf_counter()
stage = build_stages(config, data.input_shape, data.task, only=config.segments - 1)[0]
seconds = time.perf_counter() - started
params = sum(p.numel() for p in stage.module.parameters())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
result = {"seconds": seconds, "peak_rss_mib": peak, "peak_before_mib": before, "stage_params": params}
print(json.dumps({**result, "tree": dni_dist.__file__}))
"""

DEFAULTS = ["model.kind=mlp", "model.width=4096", "model.depth=8", "segments=4", "method=sg"]


def measure(tree: str, overrides: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": tree}
    # Run inside the tree: ``python -c`` puts the working directory first on the path.
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(overrides)],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["tree"].startswith(os.path.abspath(tree)):
        raise SystemExit(f"{tree}: imported dni_dist from {result['tree']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="+", required=True, metavar="LABEL=PATH")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.trees)
    overrides = DEFAULTS + args.set
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in trees}
    for _ in range(args.repeats):
        for label, path in trees.items():
            runs[label].append(measure(path, overrides))
    print("config:", " ".join(overrides))
    for label, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        peak = statistics.median(r["peak_rss_mib"] for r in results)
        grown = statistics.median(r["peak_rss_mib"] - r["peak_before_mib"] for r in results)
        print(
            f"{label}: build_stages(only=last) {seconds:.2f} s (median of {len(results)}), "
            f"peak RSS {peak:.0f} MiB (+{grown:.0f} MiB in the build), "
            f"stage params {int(results[0]['stage_params'])} ({trees[label]})"
        )


if __name__ == "__main__":
    main()
