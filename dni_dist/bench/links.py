"""``dni-dist bench links``: throughput over an emulated slow link, DNI against backprop.

Sweeps the one-way link latency (0, 1, 10, 50 ms; ``dist.link_latency``, optionally a
bandwidth cap ``dist.link_bandwidth``) for K segments on the Ray engine over gloo, and
measures samples/s of

- ``sg``: DNI, async, true targets, at the default ``dist.max_in_flight`` (automatic: K);
- ``sg-inflight8``: the same with ``dist.max_in_flight=8`` (targets up to ~8 steps stale);
- ``gpipe-m4``: pipelined backprop in our stage loop, ``dist.micro_batches=4``;
- ``backprop``: naive model-parallel backprop (one step in flight).

Writes OUT/links.json, OUT/links.md and OUT/links.png.

    python -m dni_dist.bench.links [--out DIR] [--quick] [--segments 2 3] [--bandwidth B]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import ray
import torch

from dni_dist.builder import load_data
from dni_dist.config import TrainConfig, load_config
from dni_dist.engines.ray_engine import start_local_ray

LATENCIES = (0.0, 0.001, 0.01, 0.05)
# label -> (method, extra overrides)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sg": ("sg", ("sg.target=true",)),
    "sg-inflight8": ("sg", ("sg.target=true", "dist.max_in_flight=8")),
    "gpipe-m4": ("backprop", ("dist.micro_batches=4",)),
    "backprop": ("backprop", ()),
}
RETAINED_AT = 0.01  # retained throughput: samples/s at 10 ms over samples/s at 0

NOTE = (
    "DNI's throughput under latency depends on dist.max_in_flight (steps stage 0 may have "
    "waiting for SG targets): a target needs a round trip (2 x latency) plus the upper stages' "
    "compute, so with 10 ms latency and a short step the default (automatic, K steps, which "
    "does not count link latency) can throttle stage 0. sg is measured at the default and at "
    "max_in_flight=8 (sg-inflight8); the larger "
    "window buys throughput with staler targets, which costs accuracy (benchmarks/RESULTS.md, "
    "'What staleness costs'). gpipe-m4 is GPipe in our stage loop (dist.micro_batches=4, one "
    "optimiser step per 4 micro-batches); backprop is naive model parallelism."
)


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:  # seconds per point: correctness of the pipeline, not meaningful numbers
        return {"width": 128, "batch": 32, "samples": 400, "warmup_epochs": 1, "epochs": 1, "cpus_per_stage": 0.5}
    return {"width": 1024, "batch": 256, "samples": 12000, "warmup_epochs": 1, "epochs": 3, "cpus_per_stage": 1.0}


def _config(label: str, segments: int, latency: float, bandwidth: float, sizes: dict[str, Any]) -> TrainConfig:
    method, extra = VARIANTS[label]
    return load_config(
        overrides=[
            f"method={method}",
            "runtime=ray",
            "transport=gloo",
            f"segments={segments}",
            "data.name=artificial",
            "data.dim=100",
            f"data.samples={sizes['samples']}",
            f"data.batch_size={sizes['batch']}",
            f"model.width={sizes['width']}",
            "model.depth=4",
            f"dist.cpus_per_stage={sizes['cpus_per_stage']}",
            f"dist.link_latency={latency}",
            f"dist.link_bandwidth={bandwidth}",
            *extra,
        ]
    )


def measure(cfg: TrainConfig, warmup_epochs: int, epochs: int) -> dict[str, Any]:
    """samples/s of ``cfg`` on the Ray engine: median over epochs after the warm-up."""
    from dni_dist.engines.ray_engine import RayRun

    data = load_data(cfg)
    run = RayRun(cfg, data)
    try:
        walls, losses = [], []
        for epoch in range(warmup_epochs + epochs):
            tick = time.perf_counter()
            losses = run.train_epoch(epoch)
            if epoch >= warmup_epochs:
                walls.append(time.perf_counter() - tick)
    finally:
        run.close()
    steps = len(data.x_train) // cfg.data.batch_size
    return {
        "samples_per_second": statistics.median(steps * cfg.data.batch_size / w for w in walls),
        "steps_per_epoch": steps,
        "train_loss": sum(losses) / len(losses) if losses else None,
    }


def run(
    out: Path,
    quick: bool,
    segments: list[int],
    latencies: list[float] | None = None,
    bandwidth: float = 0.0,
) -> dict[str, Any]:
    """Sweep link latency for every K in ``segments`` (default 2); write links.json/.md/.png under ``out``."""
    segments = segments or [2]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = _sizes(quick)
    sweep = list(LATENCIES if latencies is None else latencies)
    started_ray = not ray.is_initialized()
    if started_ray:
        cpus = max(2, max(segments) * int(max(1, sizes["cpus_per_stage"])))
        start_local_ray(cpus)
    results = []
    try:
        for k in segments:
            for label in VARIANTS:
                for latency in sweep:
                    cfg = _config(label, k, latency, bandwidth, sizes)
                    point = measure(cfg, sizes["warmup_epochs"], sizes["epochs"])
                    results.append(
                        {
                            "label": label,
                            "method": cfg.method,
                            "segments": k,
                            "latency_s": latency,
                            "bandwidth": bandwidth,
                            "max_in_flight": cfg.dist.max_in_flight,
                            "micro_batches": cfg.dist.micro_batches,
                            **point,
                        }
                    )
                    print(
                        f"K={k} {label:>13} latency={latency * 1000:g} ms: {point['samples_per_second']:.0f} samples/s",
                        flush=True,
                    )
    finally:
        if started_ray:
            ray.shutdown()
    payload = {
        "setup": {
            "model": f"mlp depth 4 width {sizes['width']}",
            "data": f"artificial dim 100, {sizes['samples']} samples, batch {sizes['batch']}",
            "engine": "ray, transport gloo, async schedule, emulated slow link on every stream",
            "cpus_per_stage": sizes["cpus_per_stage"],
            "warmup_epochs": sizes["warmup_epochs"],
            "measured_epochs": sizes["epochs"],
            "latencies_s": sweep,
            "bandwidth": bandwidth,
            "quick": quick,
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "variants": {label: {"method": m, "overrides": list(extra)} for label, (m, extra) in VARIANTS.items()},
            "note": NOTE,
        },
        "results": results,
        "retained": _retained(results, segments),
    }
    (out / "links.json").write_text(json.dumps(payload, indent=2))
    (out / "links.md").write_text(_markdown(payload, segments))
    _plot(results, segments, out / "links.png")
    return payload


def _retained(results: list[dict[str, Any]], segments: list[int]) -> dict[str, float | None]:
    """Per variant (and K when several): samples/s at 10 ms over samples/s at 0 ms."""
    retained: dict[str, float | None] = {}
    for k in segments:
        for label in VARIANTS:
            at = {
                r["latency_s"]: r["samples_per_second"] for r in results if r["label"] == label and r["segments"] == k
            }
            key = label if len(segments) == 1 else f"{label} K={k}"
            base = at.get(0.0)
            retained[key] = at[RETAINED_AT] / base if base and RETAINED_AT in at else None
    return retained


def _markdown(payload: dict[str, Any], segments: list[int]) -> str:
    setup, results = payload["setup"], payload["results"]
    sweep = setup["latencies_s"]
    lines = [
        "# Throughput over a slow link",
        "",
        f"{setup['model']}; {setup['data']}; {setup['engine']}; bandwidth cap "
        f"{setup['bandwidth'] or 'none'} B/s; {setup['cpus_per_stage']} CPU per stage"
        + (" (quick run: sizes for a smoke test, not measurements)." if setup["quick"] else "."),
        "",
    ]
    for k in segments:
        lines += [f"## K = {k}: samples/s by one-way latency", ""]
        lines.append("| variant | " + " | ".join(f"{lat * 1000:g} ms" for lat in sweep) + " | retained at 10 ms |")
        lines.append("|---|" + "---|" * (len(sweep) + 1))
        for label in VARIANTS:
            at = {
                r["latency_s"]: r["samples_per_second"] for r in results if r["label"] == label and r["segments"] == k
            }
            key = label if len(segments) == 1 else f"{label} K={k}"
            kept = payload["retained"].get(key)
            cells = " | ".join(f"{at[lat]:.0f}" if lat in at else "-" for lat in sweep)
            lines.append(f"| {label} | {cells} | {'-' if kept is None else f'{kept:.2f}'} |")
        lines.append("")
    lines += ["## Note", "", setup["note"], ""]
    return "\n".join(lines)


def _plot(results: list[dict[str, Any]], segments: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = sorted({r["latency_s"] for r in results})
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k in segments:
        for label in VARIANTS:
            at = {
                r["latency_s"]: r["samples_per_second"] for r in results if r["label"] == label and r["segments"] == k
            }
            xs = [i for i, lat in enumerate(sweep) if lat in at]
            name = label if len(segments) == 1 else f"{label} K={k}"
            ax.plot(xs, [at[sweep[i]] for i in xs], marker="o", label=name)
    ax.set_xticks(range(len(sweep)), [f"{lat * 1000:g}" for lat in sweep])  # 0 has no log scale
    ax.set_xlabel("one-way link latency (ms)")
    ax.set_ylabel("samples / s")
    ax.set_title("Throughput over an emulated slow link")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-links")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--segments", type=int, nargs="+", default=[2])
    parser.add_argument("--bandwidth", type=float, default=0.0, help="bytes/s per stream, 0 = unlimited")
    args = parser.parse_args()
    payload = run(Path(args.out), args.quick, args.segments, bandwidth=args.bandwidth)
    for key, kept in payload["retained"].items():
        print(f"{key}: {'-' if kept is None else f'{kept:.2f}'} of its 0 ms throughput at 10 ms")


if __name__ == "__main__":
    main()
