"""Everything one GPU can show about the data plane, in at most about 6 minutes.

    python benchmarks/gpu_check.py [--out runs/gpu_check]   # on a machine with one CUDA GPU
    python benchmarks/gpu_check.py --cpu-dry-run            # the same code path, tiny, on CPU

Sections (each timed, each recorded even when it fails, so one failure loses nothing else):
- plain: plain PyTorch backprop of the same MLP on the GPU (the reference samples/s);
- stage: the local engine's stages on the GPU, stage step time with the SG (method=sg) and
  without it (method=backprop), so the SG's share of a stage step (also with the SG run
  twice a step, as a pipeline whose targets come a step late runs it);
- sync: the local engine's hot path under ``torch.cuda.set_sync_debug_mode("error")``: the
  first hidden host sync raises and is recorded by name (0 host syncs is the target);
- ray-gloo, ray-grpc: K stages sharing the GPU (fractional GPUs), CUDA tensors over gloo
  (host copies on each link's own CUDA stream: gloo point-to-point takes CPU tensors only)
  and over gRPC; samples/s against plain backprop;
- bf16: a wide matmul block forward and backward in bf16 autocast against fp32 (TF32 on);
  and, where the config has a ``precision`` key, the local engine at precision=bf16.
NCCL is not exercised: NCCL refuses two ranks on one GPU ("Duplicate GPU detected"), so
one GPU cannot run it; the per-link design is in dni_dist/transports/torch_dist.py.

Writes OUT/gpu_check.json and OUT/gpu_check.md. Exit 0 when every section ran, 1 when one
failed, 2 when there is no CUDA device (and no --cpu-dry-run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SECTION_BUDGET_S = 60.0  # each section stops adding windows past this; 6 sections < 6 min


@dataclasses.dataclass(frozen=True)
class Size:
    width: int
    depth: int
    batch: int
    samples: int
    dim: int
    segments: int
    epochs: int
    block: int  # the bf16 section's square matmul size

    def overrides(self, *extra: str) -> list[str]:
        return [
            "model.kind=mlp",
            f"model.width={self.width}",
            f"model.depth={self.depth}",
            f"data.batch_size={self.batch}",
            "data.name=artificial",
            f"data.dim={self.dim}",
            "data.outputs=2",  # artificial classification is binary
            f"data.samples={self.samples}",
            f"segments={self.segments}",
            "optim.name=adam",
            *extra,
        ]


GPU_SIZE = Size(width=2048, depth=6, batch=512, samples=16384, dim=1024, segments=2, epochs=4, block=4096)
DRY_SIZE = Size(width=32, depth=2, batch=16, samples=128, dim=16, segments=2, epochs=2, block=64)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # window edges only, never inside the hot path


def _stages_on(config: Any, device: torch.device) -> tuple[Any, Any]:
    from dni_dist.builder import build_stages, load_data

    data = load_data(config)
    stages = build_stages(config, data.input_shape, data.task)
    for stage in stages:
        stage.module.to(device)
        if stage.boundary is not None:
            stage.boundary.to(device)
    return stages, data


def _device_batches(data: Any, batch: int, epoch: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from dni_dist.data import batches

    return [(x.to(device), y.to(device)) for x, y in batches(data.x_train, data.y_train, batch, 0, epoch)]


def plain_backprop(size: Size, device: torch.device) -> dict[str, Any]:
    """The same MLP as one nn.Sequential, Adam, cross-entropy: what a user writes by hand."""
    from dni_dist.builder import load_data
    from dni_dist.config import load_config

    data = load_data(load_config(overrides=size.overrides("method=backprop")))
    layers: list[torch.nn.Module] = []
    width_in = size.dim
    for _ in range(size.depth):
        layers += [torch.nn.Linear(width_in, size.width), torch.nn.ReLU()]
        width_in = size.width
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width_in, data.task.n_outputs)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rates = []
    started = time.monotonic()
    for epoch in range(size.epochs):
        batches = _device_batches(data, size.batch, epoch, device)
        _sync(device)
        tick = time.perf_counter()
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        _sync(device)
        rates.append(len(batches) * size.batch / (time.perf_counter() - tick))
        if time.monotonic() - started > SECTION_BUDGET_S:
            break
    return {"samples_per_second": _median(rates[1:] or rates), "windows": rates}


class _DeviceTimer:
    """The device-timeline span of one stage's calls: a CUDA event before and after each
    (on the stream the stage computes on), summed once the window is synchronised. A span
    also holds any time the GPU waited for the CPU to issue the call's kernels, so where
    launching is the bottleneck (small segments) it comes close to the issue time. A
    stage's own ``compute_seconds`` is the CPU's time to *issue* its work (stage.py), which
    on a GPU says little about the step: launches run ahead, then block when the queue fills."""

    def __init__(self, stage: Any) -> None:
        self.pairs: list[tuple[Any, Any]] = []
        for name in ("forward", "update", "on_message"):
            setattr(stage, name, self._timed(getattr(stage, name)))

    def _timed(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                return method(*args, **kwargs)
            finally:
                end.record()
                self.pairs.append((start, end))

        return call

    def take_ms(self) -> float:
        """Milliseconds of device time since the last call (after a synchronise)."""
        pairs, self.pairs = self.pairs, []
        return sum(start.elapsed_time(end) for start, end in pairs)


def local_engine(size: Size, device: torch.device, *extra: str, keep_sg_output: bool = True) -> dict[str, Any]:
    """The local engine's stages on the device: samples/s and each stage's step time (device
    time from CUDA events on a GPU; the issuing CPU's time as well, and alone on the CPU)."""
    from dni_dist.config import load_config
    from dni_dist.engines.local import LocalEngine

    stages, data = _stages_on(load_config(overrides=size.overrides(*extra)), device)
    for stage in stages:
        stage.keeps_sg_prediction &= keep_sg_output
    engine = LocalEngine(stages)
    timers = [_DeviceTimer(s) for s in stages] if device.type == "cuda" else []
    rates, issue, on_device = [], [], []
    started = time.monotonic()
    for epoch in range(size.epochs):
        batches = _device_batches(data, size.batch, epoch, device)
        before = [s.stats.compute_seconds for s in stages]
        _sync(device)
        for timer in timers:
            timer.take_ms()  # nothing before this window
        tick = time.perf_counter()
        for x, y in batches:
            engine.train_step(x, y)
        _sync(device)
        rates.append(len(batches) * size.batch / (time.perf_counter() - tick))
        n = len(batches)
        issue.append([1e3 * (s.stats.compute_seconds - b) / n for s, b in zip(stages, before, strict=True)])
        on_device.append([t.take_ms() / n for t in timers])
        if time.monotonic() - started > SECTION_BUDGET_S:
            break

    def per_stage(windows: list[list[float]]) -> list[float]:
        timed = windows[1:] or windows  # the first window is warm-up
        return [round(_median([w[i] for w in timed], 3), 3) for i in range(len(timed[0]))]

    issued = per_stage(issue)
    return {
        "settings": list(extra),
        "samples_per_second": _median(rates[1:] or rates),
        # Device-timeline span per step on a GPU (CUDA events); on the CPU the compute's own time.
        "stage_ms_per_step": per_stage(on_device) if timers else issued,
        "stage_issue_ms_per_step": issued,  # the CPU's time to issue each stage's work
        "windows": rates,
    }


def stage_sg_share(size: Size, device: torch.device) -> dict[str, Any]:
    """Stage 0's step with the SG against without it. In lockstep the SG's output for the
    update also serves its training; in a pipeline whose targets come a step late the SG
    runs twice a step (core/stage.py), so that share is measured too."""
    with_sg = local_engine(size, device, "method=sg")
    twice = local_engine(size, device, "method=sg", keep_sg_output=False)
    without = local_engine(size, device, "method=backprop")
    lower_bp = without["stage_ms_per_step"][0]

    def share(run: dict[str, Any]) -> float | None:
        lower_sg = run["stage_ms_per_step"][0]
        return round((lower_sg - lower_bp) / lower_sg, 3) if lower_sg else None

    return {
        "with_sg": with_sg,
        "with_sg_run_twice": twice,
        "without_sg": without,
        # Stage 0's step: forward, SG, update, SG training vs forward and backward alone.
        "sg_share_of_stage_step": share(with_sg),
        "sg_share_of_stage_step_sg_run_twice": share(twice),
    }


def sync_free(size: Size, device: torch.device) -> dict[str, Any]:
    """The hot path (the local engine's steps on device batches) with hidden syncs as errors.
    The engine reads its losses at poll time, not here: ``train_step``'s return is ignored."""
    if device.type != "cuda":
        return {"skipped": "set_sync_debug_mode needs CUDA"}
    from dni_dist.config import load_config
    from dni_dist.engines.local import LocalEngine

    stages, data = _stages_on(load_config(overrides=size.overrides("method=sg")), device)
    engine = LocalEngine(stages)
    batches = _device_batches(data, size.batch, 0, device)
    engine.train_step(*batches[0])  # warm-up: lazy state (optimiser moments) is made here
    _sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in batches[1:6]:
            engine.train_step(x, y)
    except RuntimeError as exc:
        where = traceback.extract_tb(exc.__traceback__)[-2:]
        return {
            "host_syncs": ">= 1",
            "first": str(exc).splitlines()[0],
            "at": [f"{f.filename}:{f.lineno}" for f in where],
        }
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"host_syncs": 0, "steps": len(batches[1:6])}


def ray_shared(size: Size, device: torch.device, transport: str) -> dict[str, Any]:
    """K stage actors on one GPU (fractional GPUs), CUDA tensors over ``transport``."""
    from dni_dist.builder import load_data
    from dni_dist.config import load_config
    from dni_dist.engines.ray_engine import RayRun

    cpus = 0.5 if device.type == "cpu" else 1.0
    config = load_config(
        overrides=size.overrides(
            "method=sg",
            "runtime=ray",
            f"transport={transport}",
            f"dist.cpus_per_stage={cpus}",
            # A stalled link fails within a minute, not the default five: the script's
            # 6 minutes must hold even when a section hangs.
            f"dist.timeout={int(SECTION_BUDGET_S)}",
        )
    )
    started = time.monotonic()
    run = RayRun(config, load_data(config))
    try:
        rates = []
        samples = run.steps_per_epoch * size.batch
        for epoch in range(size.epochs):
            tick = time.perf_counter()
            run.train_epoch(epoch)
            rates.append(samples / (time.perf_counter() - tick))
            if time.monotonic() - started > SECTION_BUDGET_S:
                break
        stages = run.stage_summaries()
    finally:
        run.close()
    return {
        "samples_per_second": _median(rates[1:] or rates),
        "windows": rates,
        "devices": [s["device"] for s in stages],
        "busy_fraction": [round(s["busy_fraction"], 3) for s in stages],
    }


def bf16_speed(size: Size, device: torch.device) -> dict[str, Any]:
    """A square matmul block (a transformer-sized MLP) forward and backward, bf16 vs fp32
    (fp32 at its best on a GPU: TF32 matmuls, set in ``main``)."""
    block = torch.nn.Sequential(
        torch.nn.Linear(size.block, 4 * size.block), torch.nn.GELU(), torch.nn.Linear(4 * size.block, size.block)
    ).to(device)
    x = torch.randn(size.batch, size.block, device=device)
    out: dict[str, Any] = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        for i in range(6):
            if i == 1:  # the first is warm-up
                _sync(device)
                tick = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                block(x).float().square().mean().backward()
        _sync(device)
        out[f"{name}_ms"] = round(1e3 * (time.perf_counter() - tick) / 5, 3)
    out["bf16_speedup"] = round(out["fp32_ms"] / out["bf16_ms"], 3)
    from dni_dist.config import TrainConfig

    if any(f.name == "precision" for f in dataclasses.fields(TrainConfig)):
        out["stage_bf16"] = local_engine(size, device, "method=sg", "precision=bf16")
    else:
        out["stage_bf16"] = {"skipped": "this build has no precision key"}
    return out


def _median(values: list[float], digits: int = 1) -> float:
    ordered = sorted(values)
    return round(ordered[len(ordered) // 2], digits) if ordered else 0.0


def run_sections(size: Size, device: torch.device) -> dict[str, Any]:
    import ray

    sections: dict[str, Callable[[], dict[str, Any]]] = {
        "plain": lambda: plain_backprop(size, device),
        "stage": lambda: stage_sg_share(size, device),
        "sync": lambda: sync_free(size, device),
        "ray-gloo": lambda: ray_shared(size, device, "gloo"),
        "ray-grpc": lambda: ray_shared(size, device, "grpc"),
        "bf16": lambda: bf16_speed(size, device),
    }
    gpus = 1 if device.type == "cuda" else 0
    ray.init(address="local", num_cpus=size.segments, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    results: dict[str, Any] = {}
    try:
        for name, section in sections.items():
            tick = time.monotonic()
            try:
                results[name] = {"ok": True, **section()}
            except Exception as exc:  # recorded; the other sections still run
                results[name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            results[name]["seconds"] = round(time.monotonic() - tick, 1)
            print(f"gpu_check: {name}: {'ok' if results[name]['ok'] else results[name]['error']}", flush=True)
    finally:
        ray.shutdown()
    return results


def markdown(payload: dict[str, Any]) -> str:
    r = payload["sections"]
    plain = r["plain"].get("samples_per_second") or 0.0

    def rate(section: dict[str, Any]) -> str:
        value = section.get("samples_per_second")
        if not value:
            return section.get("error", section.get("skipped", "-"))
        return f"{value:.0f} ({value / plain:.2f}x plain)" if plain else f"{value:.0f}"

    stage = r["stage"]
    syncs = r["sync"].get("host_syncs", r["sync"].get("skipped", r["sync"].get("error")))
    lines = [
        "# GPU check",
        "",
        f"- device: {payload['device']}; torch {payload['torch']}; size {payload['size']}",
        "- NCCL: not run (one GPU cannot hold two NCCL ranks)",
        "",
        "| check | result |",
        "|---|---|",
        f"| plain PyTorch backprop, samples/s | {rate(r['plain'])} |",
        f"| local engine, sg, samples/s | {rate(stage.get('with_sg', stage))} |",
        f"| stage ms/step on the device timeline, with SG / without | "
        f"{stage.get('with_sg', {}).get('stage_ms_per_step')} / "
        f"{stage.get('without_sg', {}).get('stage_ms_per_step')} |",
        f"| stage ms/step to issue (CPU), with SG / without | "
        f"{stage.get('with_sg', {}).get('stage_issue_ms_per_step')} / "
        f"{stage.get('without_sg', {}).get('stage_issue_ms_per_step')} |",
        f"| SG share of stage 0's step (lockstep; SG run twice, as in a pipeline) | "
        f"{stage.get('sg_share_of_stage_step')}; {stage.get('sg_share_of_stage_step_sg_run_twice')} |",
        f"| host syncs in the hot path | {syncs} {r['sync'].get('first', '')} |",
        f"| Ray K stages on one GPU, gloo, samples/s | {rate(r['ray-gloo'])} |",
        f"| Ray K stages on one GPU, gRPC, samples/s | {rate(r['ray-grpc'])} |",
        f"| bf16 / fp32 block speed-up | {r['bf16'].get('bf16_speedup', r['bf16'].get('error'))} |",
        f"| local engine at precision=bf16, samples/s | {rate(r['bf16'].get('stage_bf16', {}))} |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_check", help="output directory")
    parser.add_argument("--cpu-dry-run", action="store_true", help="the same code path on CPU at a tiny size")
    args = parser.parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU or use --cpu-dry-run"
        )
        return 2
    torch.set_num_threads(1 if args.cpu_dry_run else min(8, torch.get_num_threads()))
    device = torch.device("cpu") if args.cpu_dry_run else torch.device("cuda:0")
    size = DRY_SIZE if args.cpu_dry_run else GPU_SIZE
    from dni_dist.core.precision import enable_tf32

    # As every engine sets it (and Ray's stage actors do): otherwise plain backprop and the
    # local engine ran strict fp32 while the Ray stages ran TF32, and the ratios would lie.
    enable_tf32(device)
    started = time.monotonic()
    sections = run_sections(size, device)
    payload = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "size": dataclasses.asdict(size),
        "seconds": round(time.monotonic() - started, 1),
        "sections": sections,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2))
    (out / "gpu_check.md").write_text(markdown(payload))
    print(markdown(payload), end="")
    return 0 if all(s["ok"] for s in sections.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
