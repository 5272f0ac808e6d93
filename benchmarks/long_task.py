"""Steps to a target test accuracy on the long task (``data.name=mnist1d``), local engine,
K=2, the default config otherwise: the same batches as ``dni-dist train --runtime local``,
with the test set evaluated every ``--every`` steps (the runner only does so per epoch).
Counts steps, not seconds, so the numbers do not depend on how busy the machine is.

    python benchmarks/long_task.py [--methods backprop sg] [--seeds 0 1] [--target 0.84]
"""

from __future__ import annotations

import argparse

import torch

from dni_dist.builder import build_stages, load_data
from dni_dist.config import load_config
from dni_dist.data import batches
from dni_dist.engines.local import LocalEngine


def curve(method: str, seed: int, epochs: int, every: int, extra: list[str]) -> list[tuple[int, float]]:
    """(step, test accuracy) every ``every`` steps and at each epoch's end."""
    cfg = load_config(overrides=["data.name=mnist1d", "segments=2", f"method={method}", f"seed={seed}", *extra])
    data = load_data(cfg)
    engine = LocalEngine(build_stages(cfg, data.input_shape, data.task))

    def accuracy() -> float:
        with torch.no_grad():
            return data.task.correct(engine.predict(data.x_test), data.y_test) / len(data.y_test)

    points, step = [], 0
    for epoch in range(epochs):
        for x, y in batches(data.x_train, data.y_train, cfg.data.batch_size, seed, epoch):
            engine.train_step(x, y)
            step += 1
            if step % every == 0:
                points.append((step, accuracy()))
        if step % every:
            points.append((step, accuracy()))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["backprop", "sg"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--target", type=float, default=0.84)
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the count of steps does not need more; keeps a shared machine usable
    print(f"| method | seed | first step >= {args.target} | best (step) | accuracy every {args.every} steps |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        for seed in args.seeds:
            points = curve(method, seed, args.epochs, args.every, args.extra)
            first = next((s for s, a in points if a >= args.target), None)
            best = max(points, key=lambda p: p[1])
            trace = " ".join(f"{a:.3f}" for _, a in points)
            print(f"| {method} | {seed} | {first or 'not reached'} | {best[1]:.3f} ({best[0]}) | {trace} |", flush=True)


if __name__ == "__main__":
    main()
