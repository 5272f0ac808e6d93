"""``dni-dist bench overhead``: what the Ray engine costs per step over the stages' compute.

One run trains the same config (digits, the default model and method, K=2 unless
``--segments`` says otherwise) on the local engine (one torch thread, as each actor has)
and on the Ray engine (its default transport, which on the bench's own Ray is shared
memory; ``--set transport=gloo`` for gloo), their epochs interleaved so that the load of a shared machine hits
each alike; the first epoch of each is left out as warm-up. Besides wall time it reports
CPU time per step (every thread of the driver, or of each actor process, from /proc): on
a shared machine wall time moves with the neighbours' load, CPU time hardly does, so the
engine's CPU per step over the local engine's is the steadier measure of its overhead.
For every stage it reports the stage's own compute (forward, backward, SG, updates:
``stats.compute_seconds``) and its wall time per step; the difference is what the engine
costs that stage (waiting on a peer included).
The headline figures are the Ray engine's samples/s over the local engine's and every
stage's busy fraction (compute / wall). Writes OUT/overhead.json and OUT/overhead.md.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from dni_dist.bench.common import machine
from dni_dist.bench.report import write_json
from dni_dist.config import TrainConfig, load_config
from dni_dist.errors import ConfigError


def configs(
    segments: int, settings: list[str], cpus_per_stage: float, batch_size: int | None
) -> tuple[TrainConfig, TrainConfig]:
    """The local and the Ray config: identical but for the runtime. The Ray run takes the
    default transport (auto: shared memory on this machine's own Ray) unless ``settings``
    name one (``transport=gloo``)."""
    common = [f"segments={segments}", *([f"data.batch_size={batch_size}"] if batch_size else []), *settings]
    local = load_config(overrides=[*common, "runtime=local"])
    ray_cfg = load_config(overrides=[*common, "runtime=ray", f"dist.cpus_per_stage={cpus_per_stage}"])
    return local, ray_cfg


class _Timed:
    """One engine's epochs, timed on the driver, with each stage's compute per epoch."""

    def __init__(self, name: str, run: Any, steps: int, threads: int = 0) -> None:
        self.name, self.run, self.steps, self.threads = name, run, steps, threads
        self.walls: list[float] = []
        self.computes: list[list[float]] = []
        self.stage_walls: list[list[float]] = []
        self.cpus: list[list[float]] = []  # CPU seconds per step: the driver's, or each actor process's

    def epoch(self, epoch: int) -> None:
        steps = self.steps
        local = self.threads > 0
        if local:  # the driver's threads: as many as this variant of the local engine gets
            previous = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            before = [s.stats.compute_seconds for s in self.run.engine.stages]
            cpu = [time.process_time()]
        else:
            pids = self.run.pids()
            cpu = [_process_cpu(pid) for pid in pids]
        tick = time.perf_counter()
        try:
            self.run.train_epoch(epoch)
        finally:
            wall = time.perf_counter() - tick
            if local:
                torch.set_num_threads(previous)
        self.walls.append(wall / steps)
        if local:
            stages = self.run.engine.stages
            self.computes.append([(s.stats.compute_seconds - b) / steps for s, b in zip(stages, before, strict=True)])
            self.cpus.append([(time.process_time() - cpu[0]) / steps])
        else:
            report = self.run.epoch_reports[-1]
            self.computes.append([r["busy_fraction"] * r["wall_seconds"] / steps for r in report])
            self.stage_walls.append([r["wall_seconds"] / steps for r in report])
            self.cpus.append([(_process_cpu(pid) - c) / steps for pid, c in zip(pids, cpu, strict=True)])

    def summary(self, batch: int, warmup: int) -> dict[str, Any]:
        walls = self.stage_walls[warmup:] if self.stage_walls else None
        out = _summarise(self.name, self.walls[warmup:], self.computes[warmup:], walls, self.steps, batch)
        if self.threads:
            out["torch_threads"] = self.threads
        cpus = self.cpus[warmup:]
        # CPU time counts every thread (transport, gloo, Ray) and hardly moves with the load of
        # a shared machine, unlike wall time: the engine's cost in CPU per step.
        out["cpu_ms_per_step"] = round(sum(1e3 * statistics.median(c[i] for c in cpus) for i in range(len(cpus[0]))), 3)
        out["cpu_ms_per_step_by_process"] = [
            round(1e3 * statistics.median(c[i] for c in cpus), 3) for i in range(len(cpus[0]))
        ]
        return out


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process, every thread included (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0  # not Linux, or on another node: no figure
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(local_cfg: TrainConfig, ray_cfg: TrainConfig, windows: int, threads: list[int]) -> list[dict[str, Any]]:
    """Every engine's epochs interleaved (local, local, ..., Ray; again), so that a change
    of load on a shared machine hits them all alike."""
    from dni_dist.builder import load_data
    from dni_dist.engines.local_run import LocalRun
    from dni_dist.engines.ray_engine import RayRun

    data = load_data(local_cfg)
    steps = len(data.x_train) // local_cfg.data.batch_size
    engines = [
        _Timed(f"local ({n} thread{'s' if n > 1 else ''})", LocalRun(local_cfg, data), steps, n) for n in threads
    ]
    ray_run = RayRun(ray_cfg, load_data(ray_cfg))
    try:
        engines.append(_Timed("ray", ray_run, ray_run.steps_per_epoch))
        for epoch in range(windows):
            for engine in engines:
                engine.epoch(epoch)
    finally:
        ray_run.close()
    summaries = [e.summary(local_cfg.data.batch_size, warmup=1) for e in engines]
    summaries[-1]["transport"] = ray_run.config.transport  # what transport=auto chose
    return summaries


def _summarise(
    engine: str,
    walls: list[float],
    computes: list[list[float]],
    stage_walls: list[list[float]] | None,
    steps: int,
    batch: int,
) -> dict[str, Any]:
    """Medians over the timed epochs, in ms per step; the local engine's stages share its wall."""
    k = len(computes[0])
    ms_step = 1e3 * statistics.median(walls)
    stages = []
    for i in range(k):
        compute = 1e3 * statistics.median(c[i] for c in computes)
        wall = 1e3 * statistics.median(w[i] for w in stage_walls) if stage_walls else ms_step
        stages.append(
            {
                "stage": i,
                "compute_ms_per_step": round(compute, 3),
                "wall_ms_per_step": round(wall, 3),
                "overhead_ms_per_step": round(wall - compute, 3),
                "busy_fraction": round(compute / wall, 3) if wall else 0.0,
            }
        )
    return {
        "engine": engine,
        "ms_per_step": round(ms_step, 3),
        "ms_per_step_windows": [round(1e3 * w, 3) for w in walls],
        "samples_per_second": round(batch / (ms_step / 1e3), 1),
        "overhead_ms_per_step": round(ms_step - _ideal(engine, [s["compute_ms_per_step"] for s in stages]), 3),
        "steps_per_epoch": steps,
        "stages": stages,
    }


def _ideal(engine: str, computes: list[float]) -> float:
    """A step's time with no engine cost: the local engine runs the stages one after the
    other, a perfect pipeline takes as long as its slowest stage."""
    return sum(computes) if engine.startswith("local") else max(computes)


def run(
    out: Path,
    quick: bool,
    segments: list[int],
    *,
    windows: int | None = None,
    settings: list[str] | None = None,
    cpus_per_stage: float | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    if len(segments) > 1:
        raise ConfigError(f"--segments {','.join(map(str, segments))}: bench overhead takes one K")
    k = segments[0] if segments else 2
    n = windows or (3 if quick else 8)
    if n < 2:
        raise ConfigError(f"--windows {n}: need at least 2 (one warm-up, one timed)")
    cpus = cpus_per_stage or 1.0
    local_cfg, ray_cfg = configs(k, list(settings or []), cpus, batch_size)
    out.mkdir(parents=True, exist_ok=True)
    import ray

    from dni_dist.engines.ray_engine import start_local_ray

    threads = [1]  # as each actor has (with 2 threads on a loaded 2-core machine it ran 10-60x slower)
    started = not ray.is_initialized()
    if started:
        start_local_ray(max(1, round(k * cpus + 0.49)))
    try:
        engines = measure(local_cfg, ray_cfg, n, threads)
    finally:
        if started:
            ray.shutdown()
    *locals_, distributed = engines
    best_local = max(locals_, key=lambda e: e["samples_per_second"])
    payload = {
        "setup": {
            "segments": k,
            "windows": n,
            "warmup_windows": 1,
            "cpus_per_stage": cpus,
            "settings": list(settings or []),
            "batch_size": ray_cfg.data.batch_size,
            "method": ray_cfg.method,
            "transport": distributed["transport"],
            "dataset": ray_cfg.data.name,
            "machine": machine([k], cpus),
        },
        "quick": quick,
        "engines": engines,
        "best_local": best_local["engine"],
        "ray_over_local_samples_per_second": round(
            distributed["samples_per_second"] / best_local["samples_per_second"], 3
        ),
        "min_busy_fraction": min(s["busy_fraction"] for s in distributed["stages"]),
    }
    write_json(out / "overhead.json", payload)
    (out / "overhead.md").write_text(markdown(payload))
    return payload


def markdown(payload: dict[str, Any]) -> str:
    s = payload["setup"]
    m = s["machine"]
    lines = [
        "# Engine overhead: Ray vs local",
        "",
        f"- command: `{m['command']}`",
        f"- {s['dataset']}, method {s['method']}, K={s['segments']}, batch {s['batch_size']}, "
        f"{s['cpus_per_stage']:g} CPU per actor, {s.get('transport', 'gloo')}; "
        f"settings: {' '.join(s['settings']) or 'none'}",
        f"- {s['windows']} epochs per engine, the first left out; medians of the rest",
        f"- machine: {m['cpu_count']} CPUs, torch {m['torch']}, {m['date']}",
        "",
        "| engine | ms/step | samples/s | overhead ms/step | CPU ms/step | stage | compute ms/step | wall ms/step "
        "| busy | process CPU ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in payload["engines"]:
        name = e["engine"]
        by_process = e["cpu_ms_per_step_by_process"]
        for st in e["stages"]:
            i = st["stage"]
            head = (
                f"| {name} | {e['ms_per_step']:.2f} | {e['samples_per_second']:.0f} | {e['overhead_ms_per_step']:.2f} "
                f"| {e['cpu_ms_per_step']:.2f} "
                if i == 0
                else "| | | | | "
            )
            process = f"{by_process[i]:.2f}" if len(by_process) > 1 else ("(one process)" if i == 0 else "")
            lines.append(
                head + f"| {i} | {st['compute_ms_per_step']:.2f} | {st['wall_ms_per_step']:.2f} | "
                f"{st['busy_fraction']:.2f} | {process} |"
            )
    lines += [
        "",
        f"Ray / best local ({payload['best_local']}) samples/s: "
        f"**{payload['ray_over_local_samples_per_second']:.2f}x**; "
        f"least busy Ray stage: {payload['min_busy_fraction']:.2f}",
    ]
    return "\n".join(lines) + "\n"
