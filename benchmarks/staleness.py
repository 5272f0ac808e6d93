"""Accuracy against SG target delay, with and without the late-target measures.

The local engine with ``sg.delay=D`` delivers every SG target D steps late, across epoch
boundaries (the engine is driven directly, so nothing drains it between epochs). Each row
trains for ``--epochs`` from scratch and reports test accuracy per seed and the median;
``before`` turns off refresh, gate and delay-aware lr (main before the staleness work),
``after`` is the default configuration, ``lag1`` and ``lag1-plain`` train the SG on the
outputs its updates used up to one SG step late (``sg.reuse_lag=1``), with and without the
late-target measures. Writes a markdown table to stdout and, with
``--out``, JSON and a PNG figure of accuracy against D.

    python benchmarks/staleness.py [--delays 0 8 32] [--seeds 0 1 2] [--segments 2]
        [--variants before after] [--set key=value ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from dni_dist.builder import build_stages, load_data
from dni_dist.config import load_config
from dni_dist.core.stage import NumericFault
from dni_dist.data import batches
from dni_dist.engines.local import LocalEngine

VARIANTS: dict[str, tuple[str, ...]] = {
    "before": ("sg.refresh=false", "sg.gate=none", "sg.delay_lr=0"),
    "refresh": ("sg.gate=none", "sg.delay_lr=0"),
    "refresh+lr": ("sg.gate=none",),
    "after": (),
    "lag1": ("sg.reuse_lag=1",),
    "lag1-plain": ("sg.reuse_lag=1", "sg.refresh=false", "sg.gate=none", "sg.delay_lr=0"),
    "lag64-plain": ("sg.reuse_lag=64", "sg.refresh=false", "sg.gate=none", "sg.delay_lr=0"),
    "ddg": ("method=ddg",),
    # FDG's kind of setting: SGD with momentum, the delayed gradient shrunk by 0.5 (FDG's lr of
    # 0.1 diverges on this MLP from a delay of 4; 0.01 trains).
    "fdg-sgd": ("method=fdg", "fdg_shrink=0.5", "optim.name=sgd", "optim.lr=0.01", "optim.momentum=0.9"),
}


def accuracy(delay: int, seed: int, epochs: int, segments: int, overrides: tuple[str, ...]) -> float:
    window = max(64, delay + 8)
    cfg = load_config(overrides=[f"seed={seed}", f"segments={segments}", f"sg.window={window}", *overrides])
    data = load_data(cfg)
    engine = LocalEngine(build_stages(cfg, data.input_shape, data.task), delay=delay)
    try:
        for epoch in range(epochs):
            for x, y in batches(data.x_train, data.y_train, cfg.data.batch_size, seed, epoch):
                engine.train_step(x, y)
            engine.check_numerics()  # raises NumericFault once per epoch (flags kept on the device)
    except NumericFault:
        return 0.0  # diverged: reported as 0.000
    return data.task.correct(engine.predict(data.x_test), data.y_test) / len(data.y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delays", type=int, nargs="+", default=[0, 4, 8, 16, 32])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--segments", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["before", "after"], choices=sorted(VARIANTS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, dict[int, list[float]]] = {}
    print(f"| variant | D | {' | '.join(f'seed {s}' for s in args.seeds)} | median |")
    print("|---" * (len(args.seeds) + 3) + "|")
    for variant in args.variants:
        overrides = (*VARIANTS[variant], *args.overrides)
        results[variant] = {}
        for delay in args.delays:
            accs = [accuracy(delay, s, args.epochs, args.segments, overrides) for s in args.seeds]
            results[variant][delay] = accs
            cells = " | ".join(f"{a:.3f}" for a in accs)
            print(f"| {variant} | {delay} | {cells} | {statistics.median(accs):.3f} |", flush=True)
    if args.out is not None:
        write(args, results)


def write(args: argparse.Namespace, results: dict[str, dict[int, list[float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    (args.out / "staleness.json").write_text(json.dumps({"setup": setup, "accuracy": results}, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, rows in results.items():
        delays = sorted(rows)
        ax.plot(delays, [statistics.median(rows[d]) for d in delays], marker="o", label=variant)
    ax.set_xlabel("SG target delay D (steps)")
    ax.set_ylabel(f"test accuracy, median of seeds {args.seeds}")
    ax.set_title(f"digits, K={args.segments}, {args.epochs} epochs")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "staleness.png", dpi=120)


if __name__ == "__main__":
    main()
