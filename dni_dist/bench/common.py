"""What the benchmarks share: the methods compared, one config per (method, K), a Ray
session, one uniform handle per method run, and the setup record every result carries.

Every method trains the same model (same seed, so the same initial weights and, for K
actors, the same cuts), on the same data and batches, with the same Adam, and is timed
the same way: the driver's wall clock around one call that trains one epoch.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from dni_dist.config import TrainConfig, load_config
from dni_dist.errors import ConfigError

# What a user would otherwise pick (all backprop), then the unlocked methods.
# backprop-1core is "one device" as a GPU cluster means it: the compute of ONE of the K
# actors; backprop-1dev is one process with all K actors' CPUs as threads (on CPUs, one
# process can use every core; on GPUs it cannot use the other GPUs).
BASELINES: tuple[str, ...] = ("backprop-1core", "backprop-1dev", "backprop-naive-mp", "gpipe", "1f1b", "ddp")
# Delayed gradients (DDG): the other way to unlock a pipeline, the one SG must beat. FDG's
# shrinking is a step size under SGD and divides away under the benchmarks' Adam, so only
# ddg runs here (`--set method=fdg` style comparisons go through `dni-dist train`).
DELAYED_METHODS: tuple[str, ...] = ("ddg",)
DNI_METHODS: tuple[str, ...] = ("sg-bootstrap", "sg-true", "dfa")
METHODS: tuple[str, ...] = BASELINES + DELAYED_METHODS + DNI_METHODS

# Methods run by our Ray engine (async schedule, gloo) and the config that selects each.
ENGINE_METHODS: dict[str, tuple[str, ...]] = {
    "backprop-naive-mp": ("method=backprop",),
    "sg-bootstrap": ("method=sg", "sg.target=bootstrap"),
    "sg-true": ("method=sg", "sg.target=true"),
    "dfa": ("method=dfa",),
    "ddg": ("method=ddg",),
}


@dataclass
class Spec:
    """The benchmark's size: model, data, batch, CPUs per actor, pipeline micro-batches."""

    width: int
    depth: int
    batch_size: int
    data: tuple[str, ...]
    cpus_per_stage: float = 1.0
    micro_batches: int = 4
    lr: float = 1e-3
    seed: int = 0
    extra: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_options(cls, opts: dict[str, Any], width: int, depth: int, batch_size: int, data: tuple[str, ...]) -> Spec:
        """A benchmark's default size, with what the user gave on the command line instead."""
        return cls(
            width=opts.get("width") or width,
            depth=opts.get("depth") if opts.get("depth") is not None else depth,
            batch_size=opts.get("batch_size") or batch_size,
            data=data,
            cpus_per_stage=opts.get("cpus_per_stage") or 1.0,
            micro_batches=opts.get("micro_batches") or 4,
            extra=tuple(opts.get("settings") or ()),
        )

    def describe(self) -> dict[str, Any]:
        # Read from the resolved config, so what --set overrides (model, data, optimiser)
        # is what the report names.
        cfg = config_for("backprop", 1, self)
        m, d = cfg.model, cfg.data
        if m.factory:
            model = f"model.factory={m.factory}"
        elif m.kind == "mlp":
            model = f"MLP {m.depth} x {m.width} {m.activation}"
        else:
            model = f"{m.kind}, depth {m.depth}, width {m.width}"
        own_data = f"data.name={d.name}" in self.data and not d.factory
        return {
            "model": model,
            "data": list(self.data)
            if own_data
            else [f"data.name={d.name}" if not d.factory else f"data.factory={d.factory}"],
            "batch_size": d.batch_size,
            "optimizer": f"{cfg.optim.name} lr={cfg.optim.lr:g}",
            "cpus_per_stage": self.cpus_per_stage,
            "micro_batches": self.micro_batches,
            "seed": cfg.seed,
            "settings": list(self.extra),
        }


def config_for(method: str, segments: int, spec: Spec) -> TrainConfig:
    """The TrainConfig of one method at K=segments. Torch baselines use method=backprop:
    they need only its model, data and optimiser settings."""
    chosen = ENGINE_METHODS.get(method, ("method=backprop",))
    return load_config(
        overrides=[
            *chosen,
            f"segments={segments}",
            "runtime=ray",
            "transport=gloo",
            "dist.schedule=async",
            f"dist.cpus_per_stage={spec.cpus_per_stage}",
            "model.kind=mlp",
            f"model.width={spec.width}",
            f"model.depth={spec.depth}",
            f"data.batch_size={spec.batch_size}",
            *spec.data,
            "optim.name=adam",
            f"optim.lr={spec.lr}",
            f"seed={spec.seed}",
            *spec.extra,
        ]
    )


def parse_methods(methods: str | list[str] | None) -> list[str]:
    if methods is None:
        return list(METHODS)
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ConfigError(f"--methods {','.join(names)!r}: unknown {unknown}; use some of {', '.join(METHODS)}")
    return names


def check_segments(segments: list[int], spec: Spec, methods: list[str]) -> list[int]:
    ks = sorted(set(segments or [2]))
    for k in ks:
        if k < 2:
            raise ConfigError(f"--segments {k}: the comparison needs K >= 2 actors")
        if k > spec.depth + 1:
            raise ConfigError(
                f"--segments {k}: the MLP of depth {spec.depth} has {spec.depth + 1} blocks; use K <= that"
            )
        if "ddp" in methods and spec.batch_size % k:
            raise ConfigError(f"batch {spec.batch_size} is not divisible by K={k}, as ddp needs; pick another batch")
        if "1f1b" in methods and spec.micro_batches < k:
            raise ConfigError(f"--micro-batches {spec.micro_batches} < K={k}: 1f1b needs at least K micro-batches")
    if {"gpipe", "1f1b"} & set(methods) and spec.batch_size % spec.micro_batches:
        raise ConfigError(f"batch {spec.batch_size} is not divisible by --micro-batches {spec.micro_batches}")
    return ks


class MethodRun(Protocol):
    def train_epoch(self, epoch: int) -> Any: ...
    def predict(self, x: torch.Tensor) -> torch.Tensor: ...
    def close(self) -> None: ...


def open_run(method: str, segments: int, spec: Spec) -> tuple[MethodRun, Any]:
    """Start one method at K=segments; returns the run and its dataset."""
    from dni_dist.bench.baselines import TorchRun
    from dni_dist.builder import load_data
    from dni_dist.engines.ray_engine import RayRun

    config = config_for(method, segments, spec)
    data = load_data(config)
    if len(data.x_train) < config.data.batch_size:
        raise ConfigError(f"batch {config.data.batch_size} exceeds the {len(data.x_train)} training samples")
    if method in ENGINE_METHODS:
        return RayRun(config, data), data
    return TorchRun(method, config, segments, spec.micro_batches), data


def check_plans(ks: list[int], methods: list[str], spec: Spec) -> None:
    """Plan every run on the meta device before anything starts: a model that does not fit
    the data (``--set`` can choose both) is one line here, not an actor's death later."""
    from dni_dist.builder import load_data, plan_layout

    for k in ks:
        for method in methods:
            config = config_for(method, k, spec)
            data = load_data(config)
            plan_layout(config, data.input_shape, data.task)  # on the meta device


class RaySession:
    """Join RAY_ADDRESS, or start a local Ray with just the logical CPUs the largest K needs
    (K actors x cpus_per_stage, which backprop-1dev gets as one actor)."""

    def __init__(self, max_segments: int, cpus_per_stage: float) -> None:
        import ray

        self.started = False
        if ray.is_initialized():
            return
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
            return
        cpus = max(1, math.ceil(max_segments * cpus_per_stage))
        from dni_dist.engines.ray_engine import start_local_ray

        start_local_ray(cpus)  # ours: dist.pin_cpus=auto pins the stages
        self.started = True

    def close(self) -> None:
        import ray

        if self.started:
            ray.shutdown()


def sweep(
    name: str,
    ks: list[int],
    methods: list[str],
    spec: Spec,
    measure_one: Callable[[str, int], dict[str, Any]],
    brief: Callable[[dict[str, Any]], str],
) -> list[dict[str, Any]]:
    """Every method at every K, one after another in one Ray session; a line per result."""
    check_plans(ks, methods, spec)
    session = RaySession(max(ks), spec.cpus_per_stage)
    results = []
    try:
        for k in ks:
            for method in methods:
                record = measure_one(method, k)
                print(f"bench {name}: {method} K={k}: {brief(record)}", flush=True)
                results.append(record)
    finally:
        session.close()
    return results


def machine(segments: list[int], cpus_per_stage: float) -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    need = max(segments) * cpus_per_stage
    return {
        "cpu_count": cpus,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cpu",
        "oversubscribed": need > cpus,  # more actor CPUs than cores: the numbers mean little
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
