"""How much does SG target staleness cost? Local engine, K=2, digits: the true gradient
for step s is delivered D steps late (a deterministic stand-in for the asynchronous
engine's delay), everything else as in the default run.

    python benchmarks/staleness.py [--delays 0 1 2 4 8] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
from collections import deque

from dni_dist.builder import build_stages, load_data
from dni_dist.config import load_config
from dni_dist.data import batches


def accuracy_with_delay(delay: int, seed: int, epochs: int) -> float:
    cfg = load_config(overrides=[f"seed={seed}", "segments=2", "sg.window=64"])
    data = load_data(cfg)
    bottom, top = build_stages(cfg, data.input_shape, data.task)
    late: deque = deque()
    step = 0
    for epoch in range(epochs):
        for x, y in batches(data.x_train, data.y_train, cfg.data.batch_size, seed, epoch):
            (activation,) = bottom.forward(step, x, y)
            bottom.update(step)
            late.extend((step, m) for m in top.forward(step, activation.tensor, activation.labels))
            while late and late[0][0] <= step - delay:
                bottom.on_message(late.popleft()[1])
            step += 1
    out = top.predict(bottom.predict(data.x_test))
    return data.task.correct(out, data.y_test) / len(data.y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delays", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    print("| target delay (steps) | " + " | ".join(f"seed {s}" for s in args.seeds) + " | median |")
    print("|---" * (len(args.seeds) + 2) + "|")
    for delay in args.delays:
        accs = [accuracy_with_delay(delay, s, args.epochs) for s in args.seeds]
        cells = " | ".join(f"{a:.3f}" for a in accs)
        print(f"| {delay} | {cells} | {statistics.median(accs):.3f} |")


if __name__ == "__main__":
    main()
