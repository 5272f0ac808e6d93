"""Will every stage fit its device? A per-stage memory estimate, before anything starts.

Computed from the plan on PyTorch's ``meta`` device (no memory allocated), per stage:
parameters, their gradients, optimiser state (Adam: two moments; SGD with momentum: one),
the SG boundary (its parameters, gradients and optimiser state), the weight stash, the
steps waiting for targets (input, activation, labels' context, with ``sg.reuse_lag`` the SG
output kept for its training and, where the stage keeps it, the forward graph's saved
tensors, counted by saved-tensor hooks as core/pending.py does at run time) times the
steps that may wait, and the working set of the step being computed. With
``precision=bf16`` activations count two bytes and the autocast weight copies are added.
Stage 0's training set counts where the run would put it on the GPU
(``data.device.fits_on_device``, the rule the run itself applies, taken against the whole
device since its free memory is known only then). It is an estimate: allocator slack and
the CUDA context (several hundred MiB) are not in it.

A bounded stash (``stash_versions`` N > 0): only N waiting steps keep a weight copy and the
graph built on it; the others keep their input, activation and context (core/pending.py).

Steps that may wait: the local engine runs in lockstep (one step, plus ``sg.delay`` held
targets); on Ray an unlocked stage may keep the in-flight limit's steps (core/pending.py,
within ``dist.pending_memory``), a locked one a step or a GPipe group.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from dni_dist.config import TrainConfig
from dni_dist.core.methods import Boundary, SyntheticBoundary
from dni_dist.core.pending import CPU_PENDING_MEMORY, GPU_PENDING_FRACTION, in_flight_limit, steps_within
from dni_dist.data.device import fits_on_device
from dni_dist.errors import ConfigError

_ADAM_MOMENTS = 2


@dataclass(frozen=True)
class StageMemory:
    """Bytes one stage needs (an estimate)."""

    stage: int
    parameters: int
    gradients: int
    optimizer: int
    sg: int
    stash: int
    pending_steps: int
    step_bytes: int  # what every waiting step holds
    working: int
    graphs: int = 0  # the forward graphs that the waiting steps with a weight copy keep
    data: int = 0  # the training set on the device (stage 0)

    @property
    def pending(self) -> int:
        return self.pending_steps * self.step_bytes + self.graphs

    @property
    def total(self) -> int:
        parts = (self.parameters, self.gradients, self.optimizer, self.sg, self.stash, self.pending, self.working)
        return sum(parts) + self.data

    def line(self) -> str:
        graphs = f" + graphs {size(self.graphs)}" if self.graphs else ""
        data = f", data {size(self.data)}" if self.data else ""
        return (
            f"stage {self.stage}: params {size(self.parameters)}, grads {size(self.gradients)}, optimizer "
            f"{size(self.optimizer)}, SG {size(self.sg)}, stash {size(self.stash)}, pending {self.pending_steps} x "
            f"{size(self.step_bytes)}{graphs}, working {size(self.working)}{data} = {size(self.total)}"
        )


@dataclass(frozen=True)
class Device:
    """Where a stage runs and how many bytes it may use there (None: not known here)."""

    name: str
    capacity: int | None
    shared_by: int = 1  # stages of this run that share it (their estimates add up)

    @property
    def pending_default(self) -> int:
        """dist.pending_memory=0's budget here (core/pending.py): half a GPU, 1 GiB on a CPU."""
        if self.name.startswith("cuda") and self.capacity:
            return int(self.capacity * GPU_PENDING_FRACTION)
        return CPU_PENDING_MEMORY


def size(n: float) -> str:
    """Bytes in B, KiB, MiB or GiB, three significant digits (whole GiB beyond 1000)."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value >= 1000 else f"{value:.3g} {unit}"
    return f"{int(n)} B"


def host_memory() -> int:
    """This machine's physical memory in bytes (no psutil: sysconf, else /proc/meminfo)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    raise OSError("cannot read this machine's memory size")


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * 4 for p in module.parameters())  # float32 master weights


def _optimizer_factor(config: TrainConfig) -> int:
    if config.optim.name == "adam":
        return _ADAM_MOMENTS
    return 1 if config.optim.momentum > 0 else 0


def _forward_bytes(
    segment: nn.Module, shape: tuple[int, ...], batch: int, grad_input: bool, device: str
) -> tuple[int, int]:
    """(bytes of the tensors autograd saves for one forward, bytes of its output), on meta or,
    for a model the meta device cannot run, on the CPU for real."""
    params = {id(p) for p in segment.parameters()}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in params:  # live weights exist anyway
            saved[id(base)] = max(saved.get(id(base), 0), base.numel() * base.element_size())
        return t

    x = torch.zeros(batch, *shape, device=device, requires_grad=grad_input)
    segment.train()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        h = segment(x)
    return sum(saved.values()), h.numel() * h.element_size()


def estimate(
    config: TrainConfig,
    segments: list[nn.Module],
    input_shape: tuple[int, ...],
    cut_shapes: list[tuple[int, ...]],
    boundaries: list[Boundary],
    output_values: int,
    where: list[Device],
    train_bytes: int = 0,
    plan_device: str = "meta",
) -> list[StageMemory]:
    """Every stage's estimate; ``segments`` and ``boundaries`` built on the meta device (the
    segments on ``plan_device``: the CPU for a model meta cannot run), ``where`` each stage
    runs (a GPU's default pending budget is half of it). ``train_bytes``: the training set's
    size (inputs and labels), counted at stage 0 when the run would keep it on the GPU.
    ``output_values``: the values of one example's output, which is also the size of the
    one-hot context and of a direct error a waiting step keeps (T x V for a language model)."""
    batch = config.data.batch_size
    half = config.precision == "bf16"
    shrink = 0.5 if half else 1.0  # activations under bf16 autocast: two bytes a value
    k_total = len(segments)
    shapes = [input_shape, *cut_shapes]
    factor = _optimizer_factor(config)
    out = []
    for k, segment in enumerate(segments):
        params = _bytes(segment)
        graph, h_bytes = _forward_bytes(segment, shapes[k], batch, grad_input=k > 0, device=plan_device)
        graph, h_bytes = int(graph * shrink), int(h_bytes * shrink)
        x_bytes = int(batch * math.prod(shapes[k]) * 4 * (shrink if k > 0 else 1.0))
        working = graph + x_bytes + h_bytes + (params // 2 if half else 0)
        boundary = boundaries[k] if k < k_total - 1 else None
        sg = stash = graphs = pending_steps = step_bytes = 0
        if boundary is not None:
            sg = _bytes(boundary) * (2 + factor)
            learned_unlocked = not boundary.update_locked
            stashes = (learned_unlocked and k > 0 and config.sg.target != "bootstrap") or boundary.runs_ahead
            # Every waiting step: input, activation, context. Its graph: a locked method's
            # step always; a stashing stage's step only with a weight copy (else recomputed).
            step_bytes = x_bytes + h_bytes + batch * output_values * 4
            if boundary.waits_for != "nothing" and not stashes:
                step_bytes += graph
            reuses = isinstance(boundary, SyntheticBoundary) and boundary.reuses_outputs
            if config.sg.reuse_lag and reuses:  # its kept SG output, shaped like h (Stage.reuse_lag)
                step_bytes += h_bytes
            budget = config.dist.pending_memory or where[k].pending_default
            copy = params + graph if stashes else 0  # what a step with a weight copy adds
            pending_steps = _waiting_steps(config, k, boundary, step_bytes + copy, copy, budget)
            if stashes:
                copies = min(config.stash_versions or pending_steps, pending_steps)
                stash, graphs = params * copies, graph * copies
        data = train_bytes if k == 0 and _data_on_device(where[k], train_bytes) else 0
        memory = StageMemory(
            k, params, params, params * factor, sg, stash, pending_steps, step_bytes, working, graphs, data
        )
        out.append(memory)
    return out


def _data_on_device(device: Device, train_bytes: int) -> bool:
    """Would the run keep stage 0's training set on this device (data/device.py)?"""
    return (
        device.name.startswith("cuda") and device.capacity is not None and fits_on_device(train_bytes, device.capacity)
    )


def _waiting_steps(
    config: TrainConfig, k: int, boundary: Boundary, step_bytes: int, stash_bytes: int, budget: int
) -> int:
    """How many steps may wait for targets at stage k (see the module's docstring); a step
    with a weight copy holds ``step_bytes``, one without ``stash_bytes`` less."""
    if config.runtime == "local":
        return 1 + (config.sg.delay if not boundary.update_locked or boundary.runs_ahead else 0)
    if boundary.update_locked and not boundary.runs_ahead:
        return config.dist.micro_batches
    versions = config.stash_versions
    limit, _ = in_flight_limit(
        config.dist.max_in_flight, config.segments, config.sg.target, budget, step_bytes, stash_bytes, versions
    )
    if k > 0 and step_bytes:
        limit = min(limit, steps_within(budget, step_bytes, stash_bytes, versions))
    return min(limit, config.sg.window)


def devices(config: TrainConfig) -> list[Device]:
    """Each stage's device as far as this machine can tell: the local engine's stages share
    the host; an embedded Ray places them on this machine's GPUs (sharing when fewer than
    stages) or its CPUs; a cluster's devices are known only once the run joins it."""
    k = config.segments
    if config.runtime == "local":
        return [Device("cpu (host memory, all stages)", host_memory(), k)] * k
    if config.dist.address or os.environ.get("RAY_ADDRESS"):
        return [Device("a cluster device", None)] * k
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        return [Device("cpu (host memory, all stages)", host_memory(), k)] * k
    per_gpu = math.ceil(k / gpus)
    return [
        Device(f"cuda:{i // per_gpu}", torch.cuda.get_device_properties(i // per_gpu).total_memory, per_gpu)
        for i in range(k)
    ]


def check_fit(estimates: list[StageMemory], where: list[Device]) -> None:
    """ConfigError (one line) naming the first stage whose device cannot hold its share."""
    for mem, device in zip(estimates, where, strict=True):
        if device.capacity is None:
            continue
        sharing = [m for m, d in zip(estimates, where, strict=True) if d == device]
        need = sum(m.total for m in sharing)
        if need > device.capacity:
            others = len(sharing) - 1
            together = f" ({size(need)} with the {others} other stage{'s' * (others > 1)} there)" if others else ""
            raise ConfigError(
                f"stage {mem.stage} needs about {size(mem.total)}{together} but {device.name} has "
                f"{size(device.capacity)}; use more segments or a smaller model, data.batch_size, "
                "dist.max_in_flight or stash_versions"
            )


def report(estimates: list[StageMemory], where: list[Device]) -> str:
    """The estimate as lines for ``--check``."""
    lines = ["memory per stage (estimate):"]
    for mem, device in zip(estimates, where, strict=True):
        cap = "unknown until the run joins the cluster" if device.capacity is None else size(device.capacity)
        lines.append(f"  {mem.line()}; {device.name}: {cap}")
    return "\n".join(lines)
