"""Is the Ray engine unlocked for real? Steady-state busy fraction (compute time / wall
time) of each stage, ``sg`` versus naive model-parallel ``backprop``, in one run.

    python benchmarks/busy_fraction.py [--segments 2] [--epochs 6] [--width 1024] [--out DIR]

Each method runs on the same actors' configuration, model, data and optimiser; the first
epoch is warm-up and left out of the medians. Writes DIR/busy_fraction.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import ray

from dni_dist.builder import load_data
from dni_dist.config import load_config
from dni_dist.engines.ray_engine import RayRun


def measure(method: str, args: argparse.Namespace) -> dict:
    cfg = load_config(
        overrides=[
            f"method={method}",
            "runtime=ray",
            "transport=gloo",
            f"segments={args.segments}",
            "data.name=artificial",
            "data.dim=100",
            "data.samples=12000",
            "data.batch_size=256",
            f"model.width={args.width}",
            "model.depth=4",
            "dist.cpus_per_stage=1",
        ]
    )
    data = load_data(cfg)
    run = RayRun(cfg, data)
    try:
        walls = []
        for epoch in range(args.epochs):
            tick = time.perf_counter()
            run.train_epoch(epoch)
            walls.append(time.perf_counter() - tick)
        reports = run.epoch_reports[1:]
    finally:
        run.close()
    steps = len(data.x_train) // cfg.data.batch_size
    return {
        "method": method,
        "segments": args.segments,
        "busy_fraction": [statistics.median(r[k]["busy_fraction"] for r in reports) for k in range(args.segments)],
        "samples_per_second": statistics.median(steps * cfg.data.batch_size / w for w in walls[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--out", default="runs/bench-busy")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=args.segments, include_dashboard=False, log_to_driver=False)
    try:
        results = [measure(m, args) for m in ("sg", "backprop")]
    finally:
        ray.shutdown()
    ratio = results[0]["samples_per_second"] / results[1]["samples_per_second"]
    for r in results:
        busy = " ".join(f"{b:.2f}" for b in r["busy_fraction"])
        print(f"{r['method']:>9}  busy per stage: {busy}  samples/s: {r['samples_per_second']:.0f}")
    print(f"sg / naive model-parallel backprop samples/s: {ratio:.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "busy_fraction.json").write_text(json.dumps({"results": results, "sg_over_backprop": ratio}, indent=2))


if __name__ == "__main__":
    main()
