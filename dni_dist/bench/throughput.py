"""``dni-dist bench throughput``: training samples/s of every method at K actors, in one run.

Each method trains several epochs (windows) on the same data; the first ``warmup``
windows (process start-up, gloo set-up, shape inference, allocator warm-up) are left out
and the median of the rest is reported. A window is timed on the driver around the one
call that trains it, the same way for every method. Writes OUT/throughput.json, .md, .png.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from dni_dist.bench.common import (
    BASELINES,
    DELAYED_METHODS,
    DNI_METHODS,
    ENGINE_METHODS,
    Spec,
    check_segments,
    machine,
    open_run,
    parse_methods,
    sweep,
)
from dni_dist.bench.report import bar_chart, setup_lines, write_json
from dni_dist.errors import ConfigError


def make_spec(quick: bool, opts: dict[str, Any]) -> tuple[Spec, int]:
    """The model and data (compute must dominate messaging at full size) and the windows."""
    if quick:
        width, depth, batch, samples, windows = 64, 3, 32, 400, 3
    else:
        # 9 hidden layers (8 of them 1024 x 1024): K=2 cuts backprop's pipelines into equal
        # halves of about 4M parameters, and sg after 4 hidden layers, not 5, since its stage 0
        # also runs the SG (balance=cost; with 4 hidden layers the only cuts leave 1.1M vs
        # 2.1M, so the pipeline would measure its imbalance); ~80 ms of compute per step and
        # stage, so compute dominates messaging.
        width, depth, batch, samples, windows = 1024, 9, 256, 12000, 6
    data = ("data.name=artificial", "data.dim=100", "data.outputs=2", f"data.samples={samples}")
    spec = Spec.from_options(opts, width, depth, batch, data)
    windows = opts.get("windows") or windows
    if windows < 2:
        raise ConfigError(f"--windows {windows}: need at least 2 (one warm-up, one timed)")
    return spec, windows


def measure(method: str, segments: int, spec: Spec, windows: int, warmup: int = 1) -> dict[str, Any]:
    run, data = open_run(method, segments, spec)
    samples = (len(data.x_train) // spec.batch_size) * spec.batch_size
    rates = []
    try:
        for epoch in range(windows):
            tick = time.perf_counter()
            run.train_epoch(epoch)
            rates.append(samples / (time.perf_counter() - tick))
        extra: dict[str, Any] = {}
        if method in ENGINE_METHODS:  # why the engine is as fast as it is: how busy each stage was
            reports = run.epoch_reports[warmup:]  # type: ignore[attr-defined]
            extra["busy_fraction"] = [
                round(statistics.median(r[k]["busy_fraction"] for r in reports), 3) for k in range(segments)
            ]
            # Each stage's own compute per window (its Stage calls: forward, backward, SG,
            # updates), and the samples/s if a step cost no more than the slowest stage's:
            # no schedule or transport can beat it, so it separates the split's limit from
            # the engine's.
            computes = [
                statistics.median(r[k]["busy_fraction"] * r[k]["wall_seconds"] for r in reports)
                for k in range(segments)
            ]
            extra["stage_compute_seconds"] = [round(c, 6) for c in computes]
            extra["compute_bound_samples_per_second"] = samples / max(computes) if max(computes) > 0 else None
    finally:
        run.close()
    timed = rates[warmup:]
    return {
        "method": method,
        "segments": segments,
        "samples_per_second": statistics.median(timed),
        "windows": timed,
        "warmup_windows": rates[:warmup],
        "samples_per_window": samples,
        **extra,
    }


def ratios(results: list[dict[str, Any]]) -> dict[str, float]:
    """Each DNI method over each backprop baseline and over the fastest one, per K."""
    out: dict[str, float] = {}
    for k in sorted({r["segments"] for r in results}):
        at_k = {r["method"]: r["samples_per_second"] for r in results if r["segments"] == k}
        base = {m: v for m, v in at_k.items() if m in BASELINES and v > 0}
        delayed = {m: v for m, v in at_k.items() if m in DELAYED_METHODS and v > 0}
        for m in DNI_METHODS:
            if m not in at_k:
                continue
            for b, v in {**base, **delayed}.items():
                out[f"{m} / {b} (K={k})"] = at_k[m] / v
            if base:
                out[f"{m} / best backprop (K={k})"] = at_k[m] / max(base.values())
    return out


def run(
    out: Path,
    quick: bool,
    segments: list[int],
    *,
    methods: str | None = None,
    width: int | None = None,
    depth: int | None = None,
    batch_size: int | None = None,
    micro_batches: int | None = None,
    cpus_per_stage: float | None = None,
    settings: list[str] | None = None,
    windows: int | None = None,
) -> dict[str, Any]:
    opts = {
        "width": width,
        "depth": depth,
        "batch_size": batch_size,
        "micro_batches": micro_batches,
        "cpus_per_stage": cpus_per_stage,
        "windows": windows,
        "settings": settings,
    }
    chosen = parse_methods(methods)
    spec, n_windows = make_spec(quick, opts)
    ks = check_segments(segments, spec, chosen)
    out.mkdir(parents=True, exist_ok=True)
    results = sweep(
        "throughput",
        ks,
        chosen,
        spec,
        lambda method, k: measure(method, k, spec, n_windows),
        lambda r: f"{r['samples_per_second']:.0f} samples/s",
    )
    setup = {**spec.describe(), "windows": n_windows, "warmup_windows": 1, "machine": machine(ks, spec.cpus_per_stage)}
    payload = {"setup": setup, "quick": quick, "results": results, "ratios": ratios(results)}
    write_json(out / "throughput.json", payload)
    (out / "throughput.md").write_text(markdown(payload))
    bar_chart(
        out / "throughput.png",
        chosen,
        {f"K={k}": [_rate(results, m, k) for m in chosen] for k in ks},
        "samples/s (median of timed windows)",
        f"Training throughput, {setup['model']}, batch {spec.batch_size}",
    )
    return payload


def _rate(results: list[dict[str, Any]], method: str, k: int) -> float | None:
    return next((r["samples_per_second"] for r in results if r["method"] == method and r["segments"] == k), None)


def markdown(payload: dict[str, Any]) -> str:
    setup = payload["setup"]
    lines = ["# Throughput: DNI vs backprop", "", *setup_lines(setup)]
    lines.append(
        f"- timing: {setup['windows']} epochs per method, the first left out as warm-up; "
        "samples/s = median over the rest, driver wall clock"
    )
    lines += [
        "",
        "| K | method | samples/s | timed windows (min-max) | / backprop-1core | / backprop-1dev |",
        "|---|---|---|---|---|---|",
    ]
    for r in payload["results"]:
        rels = []
        for reference in ("backprop-1core", "backprop-1dev"):
            one = _rate(payload["results"], reference, r["segments"])
            rels.append(f"{r['samples_per_second'] / one:.2f}" if one else "")
        span = f"{min(r['windows']):.0f}-{max(r['windows']):.0f}"
        lines.append(
            f"| {r['segments']} | {r['method']} | {r['samples_per_second']:.0f} | {span} | {rels[0]} | {rels[1]} |"
        )
    bounded = [r for r in payload["results"] if r.get("compute_bound_samples_per_second")]
    if bounded:
        lines += [
            "",
            "Engine runs against their slowest stage's compute: the samples/s if a step cost only the",
            "compute of the slowest stage (its forward, backward, SG and updates), which no schedule",
            "or transport can beat.",
            "",
            "| K | method | samples/s | slowest stage's bound | share of the bound | busy per stage |",
            "|---|---|---|---|---|---|",
        ]
        for r in bounded:
            bound = r["compute_bound_samples_per_second"]
            busy = ", ".join(f"{b:.2f}" for b in r["busy_fraction"])
            lines.append(
                f"| {r['segments']} | {r['method']} | {r['samples_per_second']:.0f} | {bound:.0f} | "
                f"{r['samples_per_second'] / bound:.2f} | {busy} |"
            )
    if payload["ratios"]:
        lines += ["", "| ratio (samples/s) | value |", "|---|---|"]
        lines += [f"| {name} | {value:.2f} |" for name, value in payload["ratios"].items()]
    return "\n".join(lines) + "\n"
