"""``dni-dist bench accuracy``: training wall time to reach a test accuracy, per method.

Each method trains epoch by epoch (at most ``max_epochs``) and is evaluated on the test
set after each one; it stops at the first epoch that reaches the target. The clock counts
training only (the driver's wall time around each epoch's call); evaluation time is
reported separately, and actor start-up is in neither. One run per method: the async
engine is not deterministic, so repeat for spread. Writes OUT/accuracy.json, .md, .png.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dni_dist.bench.common import (
    BASELINES,
    DELAYED_METHODS,
    DNI_METHODS,
    Spec,
    check_segments,
    machine,
    open_run,
    parse_methods,
    sweep,
)
from dni_dist.bench.report import bar_chart, setup_lines, write_json
from dni_dist.config import parse_override
from dni_dist.errors import ConfigError

# Per dataset, the default (quick, full) sizes: MLP width, depth, batch, target test
# accuracy, epochs cap. digits: what backprop reaches in a few epochs. mnist1d: the config's
# default MLP (3 x 256, Adam 1e-3) at batch 64, where backprop levels off near 0.85-0.86 and
# first reaches 0.84 after 2,100-3,100 steps (seeds 0-2, benchmarks/RESULTS.md): a run long
# enough for time to accuracy to matter (a 4 x 1024 MLP at batch 128 reaches 0.83 in 780).
# Quick sizes are CI's: a few epochs per method (on mnist1d every method measured reached
# 0.65 in its third epoch).
SIZES: dict[str, tuple[tuple[int, int, int, float, int], tuple[int, int, int, float, int]]] = {
    "digits": ((64, 3, 32, 0.8, 3), (1024, 4, 128, 0.95, 30)),
    "mnist1d": ((64, 3, 128, 0.65, 3), (256, 3, 64, 0.84, 20)),
}


def dataset_of(opts: dict[str, Any]) -> str:
    """The dataset every method trains on: the last ``--set data.name=...`` (settings are
    applied after the flags, as in ``dni-dist train``), else ``--dataset``, else digits."""
    name = opts.get("dataset") or "digits"
    for text in opts.get("settings") or ():
        keys, value = parse_override(text)
        if keys == ["data", "name"]:
            name = str(value)
    return name


def make_spec(quick: bool, opts: dict[str, Any]) -> tuple[Spec, float, int]:
    dataset = dataset_of(opts)
    # A dataset without its own sizes gets digits' model and batch, but no guessed target.
    width, depth, batch, target, max_epochs = SIZES.get(dataset, SIZES["digits"])[0 if quick else 1]
    spec = Spec.from_options(opts, width, depth, batch, (f"data.name={dataset}",))
    if opts.get("target_accuracy") is not None:
        target = opts["target_accuracy"]
    elif dataset not in SIZES:
        known = ", ".join(SIZES)
        raise ConfigError(f"data.name={dataset!r} has no default target ({known} do); give --target-accuracy")
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"--target-accuracy {target}: use a fraction in (0, 1]")
    max_epochs = opts.get("max_epochs") or max_epochs
    if max_epochs < 1:
        raise ConfigError(f"--max-epochs {max_epochs}: need at least 1")
    return spec, target, max_epochs


def time_to_target(method: str, segments: int, spec: Spec, target: float, max_epochs: int) -> dict[str, Any]:
    run, data = open_run(method, segments, spec)
    history: list[dict[str, float]] = []
    train_seconds = eval_seconds = 0.0
    reached: float | None = None
    try:
        for epoch in range(max_epochs):
            tick = time.perf_counter()
            run.train_epoch(epoch)
            train_seconds += time.perf_counter() - tick
            tick = time.perf_counter()
            output = run.predict(data.x_test)
            accuracy = data.task.accuracy(output, data.y_test)
            eval_seconds += time.perf_counter() - tick
            history.append({"epoch": epoch + 1, "train_seconds": train_seconds, "test_accuracy": accuracy})
            if accuracy >= target:
                reached = train_seconds
                break
    finally:
        run.close()
    return {
        "method": method,
        "segments": segments,
        "time_to_target": reached,
        "epochs": len(history),
        "final_accuracy": history[-1]["test_accuracy"],
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "history": history,
    }


def ratios(results: list[dict[str, Any]]) -> dict[str, float | None]:
    """Each DNI method's time to target over the fastest backprop's (lower is better for
    DNI); None where either did not reach the target."""
    out: dict[str, float | None] = {}
    for k in sorted({r["segments"] for r in results}):
        at_k = {r["method"]: r["time_to_target"] for r in results if r["segments"] == k}
        base = [v for m, v in at_k.items() if m in BASELINES and v]
        best = min(base) if base else None
        for m in DNI_METHODS:
            if m in at_k:
                mine = at_k[m]
                out[f"{m} / best backprop (K={k})"] = mine / best if mine and best else None
                for d in DELAYED_METHODS:
                    if d in at_k:
                        theirs = at_k[d]
                        out[f"{m} / {d} (K={k})"] = mine / theirs if mine and theirs else None
    return out


def run(
    out: Path,
    quick: bool,
    segments: list[int],
    *,
    methods: str | None = None,
    target_accuracy: float | None = None,
    max_epochs: int | None = None,
    width: int | None = None,
    depth: int | None = None,
    batch_size: int | None = None,
    micro_batches: int | None = None,
    cpus_per_stage: float | None = None,
    settings: list[str] | None = None,
    dataset: str | None = None,
) -> dict[str, Any]:
    opts = {
        "dataset": dataset,
        "target_accuracy": target_accuracy,
        "max_epochs": max_epochs,
        "width": width,
        "depth": depth,
        "batch_size": batch_size,
        "micro_batches": micro_batches,
        "cpus_per_stage": cpus_per_stage,
        "settings": settings,
    }
    chosen = parse_methods(methods)
    spec, target, epochs_cap = make_spec(quick, opts)
    ks = check_segments(segments, spec, chosen)
    out.mkdir(parents=True, exist_ok=True)

    def brief(r: dict[str, Any]) -> str:
        when = f"{r['time_to_target']:.2f} s" if r["time_to_target"] is not None else "not reached"
        return f"{when} ({r['epochs']} epochs)"

    results = sweep(
        "accuracy", ks, chosen, spec, lambda method, k: time_to_target(method, k, spec, target, epochs_cap), brief
    )
    setup = {
        **spec.describe(),
        "target_accuracy": target,
        "max_epochs": epochs_cap,
        "clock": "training wall time only (driver); evaluation reported as eval_seconds; actor start-up excluded",
        "machine": machine(ks, spec.cpus_per_stage),
    }
    payload = {"setup": setup, "quick": quick, "results": results, "ratios": ratios(results)}
    write_json(out / "accuracy.json", payload)
    (out / "accuracy.md").write_text(markdown(payload))
    bar_chart(
        out / "accuracy.png",
        chosen,
        {f"K={k}": [_time(results, m, k) for m in chosen] for k in ks},
        f"training seconds to {target:.0%} test accuracy (no bar: not reached)",
        f"Time to target, {setup['model']}, batch {spec.batch_size}",
    )
    return payload


def _time(results: list[dict[str, Any]], method: str, k: int) -> float | None:
    return next((r["time_to_target"] for r in results if r["method"] == method and r["segments"] == k), None)


def markdown(payload: dict[str, Any]) -> str:
    setup = payload["setup"]
    lines = ["# Time to target accuracy: DNI vs backprop", "", *setup_lines(setup)]
    lines.append(
        f"- target: {setup['target_accuracy']:.0%} test accuracy, at most {setup['max_epochs']} epochs, "
        f"evaluated after each epoch; clock: {setup['clock']}"
    )
    lines += [
        "",
        "| K | method | seconds to target | epochs | final accuracy | eval seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in payload["results"]:
        t = f"{r['time_to_target']:.2f}" if r["time_to_target"] is not None else "not reached"
        lines.append(
            f"| {r['segments']} | {r['method']} | {t} | {r['epochs']} | {r['final_accuracy']:.3f} "
            f"| {r['eval_seconds']:.2f} |"
        )
    if payload["ratios"]:
        lines += ["", "| ratio (time to target; < 1: DNI faster) | value |", "|---|---|"]
        for name, value in payload["ratios"].items():
            lines.append(f"| {name} | {'n/a' if value is None else f'{value:.2f}'} |")
    return "\n".join(lines) + "\n"
