"""Check a whole run before anything starts: the config's fields (config.py), then the data
set's shapes and the plan of the model, its cuts and an SG at each cut.

Models and SGs are built on PyTorch's ``meta`` device: every shape and constructor check
runs, but no parameter memory is allocated and nothing is computed, so a plan for a huge
model costs milliseconds. ``dni-dist train --check`` prints the result and stops.
"""

from __future__ import annotations

import math

import torch

from dni_dist.builder import count_costs, load_data, make_boundary, plan_layout
from dni_dist.config import TrainConfig
from dni_dist.core.partition import segment_loads
from dni_dist.data import Dataset
from dni_dist.errors import ConfigError
from dni_dist.operations import memory


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check_gpus(config: TrainConfig) -> None:
    """NCCL needs one GPU per stage. Only an embedded Ray (no address) can be judged here:
    it sees this machine's GPUs; a cluster's are counted when the run joins it."""
    import os

    if config.runtime != "ray" or config.transport != "nccl" or config.dist.address or os.environ.get("RAY_ADDRESS"):
        return
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < config.segments:
        raise ConfigError(
            f"transport=nccl needs one GPU per stage ({config.segments}), this machine has {gpus}; "
            "use transport=gloo or join a GPU cluster (--address)"
        )


def preflight(config: TrainConfig, dataset: Dataset | None = None) -> str:
    """Raise ConfigError for anything that would fail while building the run, a stage that
    cannot fit its device included; else return a one-line plan (blocks, cuts, shapes,
    parameter counts and FLOPs per step per segment) and the memory estimate per stage
    (operations/memory.py), one line each. ``dataset``:
    the run's data when the caller has loaded it already (else it is loaded here)."""
    _check_gpus(config)
    if dataset is None:
        dataset = load_data(config)  # the real data: its path, shapes and task
    n_train = len(dataset.x_train)
    if n_train < config.data.batch_size:
        raise ConfigError(f"data.batch_size={config.data.batch_size} exceeds the {n_train} training samples; lower it")
    task = dataset.task
    # Planned on the meta device (or the CPU, for a model meta cannot run): FA's twins are
    # made only when a stage is built, so the plan's layers are plain ones of the same shapes.
    plan = plan_layout(config, dataset.input_shape, task)
    with torch.device("meta"):
        boundaries = [make_boundary(config, task, k, shape) for k, shape in enumerate(plan.cut_shapes)]
    blocks = [len(segment) for segment in plan.segments]
    cuts = plan.cuts
    params = [_count(segment) for segment in plan.segments]
    blocks_in_order = [b for segment in plan.segments for b in segment]
    costs = count_costs(config, blocks_in_order, dataset.input_shape, task, plan.device)
    gflops = [f"{load / 1e9:.3g}" for load in segment_loads(costs.top, cuts, costs.after, costs.below)]
    model = config.model.factory or config.model.kind
    where = f"runtime={config.runtime}" + (f" transport={config.transport}" if config.runtime == "ray" else "")
    # Memory last: a run that cannot fit its devices is refused with the plan's shapes known.
    placed = memory.devices(config)
    needs = memory.estimate(
        config,
        plan.segments,
        dataset.input_shape,
        plan.cut_shapes,
        boundaries,
        math.prod(task.output_shape),
        placed,
        train_bytes=dataset.x_train.nbytes + dataset.y_train.nbytes,
        plan_device=plan.device,
    )
    memory.check_fit(needs, placed)
    return (
        f"plan: {config.method} on {dataset.name} {_shape(dataset.input_shape)} ({n_train} train, "
        f"{n_train // config.data.batch_size} steps/epoch), {model} of {sum(blocks)} blocks in "
        f"{config.segments} segments, cuts {_brief(cuts)}, cut shapes {_brief([_shape(s) for s in plan.cut_shapes])}, "
        f"params per segment {_brief(params)} ({math.fsum(params):.0f} total), GFLOP per stage step "
        f"{_brief(gflops)}, {where}\n{memory.report(needs, placed)}"
    )


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _brief(items: list) -> str:
    """A list short enough for one line: its ends when it is long."""
    if len(items) <= 6:
        return "[" + ", ".join(map(str, items)) + "]"
    return f"[{', '.join(map(str, items[:3]))}, ..., {', '.join(map(str, items[-2:]))}] ({len(items)})"
