"""Run configuration as plain dataclasses, loaded from YAML and ``--set key=value``.

Every field is typed and checked here, so a bad value fails before anything starts,
with one line naming the field, the value and what is allowed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import os
import re
import threading
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dni_dist.core.imports import check_spec
from dni_dist.core.methods import METHODS
from dni_dist.core.partition import BALANCES
from dni_dist.core.precision import PRECISIONS
from dni_dist.core.stage import TARGET_MODES
from dni_dist.core.staleness import GATES
from dni_dist.core.synthetic import SG_KINDS, WRAPPERS, SGSpec
from dni_dist.data import DATASETS
from dni_dist.errors import ConfigError
from dni_dist.models import ACTIVATIONS, MODEL_KINDS, ModelSpec
from dni_dist.transports.addresses import is_loopback

RUNTIMES = ("local", "ray")
TRANSPORTS = ("auto", "gloo", "nccl", "grpc", "shm")
OPTIMIZERS = ("adam", "sgd")


@dataclass
class SGConfig(SGSpec):
    """The SG module (SGSpec's fields) and how it is trained."""

    target: str = "true"
    target_lambda: float = 0.5
    lr: float = 1e-3
    window: int = 64
    # Clip each example's SG output to this L2 norm before it is used (0 = off): a bound on
    # what a badly trained SG can do to its segment.
    clip: float = 0.0
    # Research knob (local engine): deliver every SG target and delayed gradient this many
    # steps late, deterministically, to reproduce the staleness of a deep asynchronous
    # pipeline on one machine. 0 = lockstep, the reference semantics.
    delay: int = 0
    # Late targets (core/staleness.py; each is a no-op while targets are fresh): train the SG
    # on h recomputed with the current weights; scale SG-driven updates by the SG's measured
    # reliability ("reliability" or "none"); divide the segment's lr by 1 + sqrt(staleness) /
    # delay_lr (0 = off).
    refresh: bool = True
    gate: str = "reliability"
    delay_lr: float = 1.0
    # The SG's output for a step's update also trains it on the step's target if the SG took
    # at most this many steps in between (core/staleness.py); 0 = exact.
    reuse_lag: int = 0


@dataclass
class DataConfig:
    name: str = "digits"
    path: str | None = None
    download: bool = False
    batch_size: int = 64
    loss: str = ""
    task: str = "classification"
    dim: int = 2
    labels: str = "separable"
    samples: int = 1000
    outputs: int = 1
    grid: bool = False
    # A user's data instead of ``name`` (data/factory.py): "package.module:function", called
    # as function(**kwargs), returning (x_train, y_train, x_test, y_test) in memory.
    factory: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    # data.name=text: tokens per example (the model's context length) and the corpus size cap.
    context: int = 64
    max_bytes: int = 1 << 20


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass
class DistConfig:
    """The distributed runtime (``runtime=ray``)."""

    schedule: str = "async"
    placement: str = "pack"
    address: str | None = None
    num_cpus: int | None = None
    cpus_per_stage: float | None = None
    # Stages on GPUs: auto = when the cluster has GPUs now; cuda = always (an autoscaling
    # cluster without a GPU node yet adds one when the stages ask); cpu = never.
    device: str = "auto"
    # Each stage's GPU share (Ray num_gpus, at most one GPU); 0 = derived: a whole GPU when
    # the cluster has one per stage, else 1/ceil(K/gpus) (dist.device=cuda on a cluster
    # with no GPU yet: a whole one).
    gpus_per_stage: float = 0.0
    # Seconds to wait for the cluster to grow when the stages need more than it has (an
    # autoscaler adding nodes), with a progress line on stderr every 10 s. A cluster that
    # already has the resources waits dist.timeout for them to free.
    scale_timeout: float = 600.0
    timeout: float = 300.0
    capacity: int = 4
    # Steps stage 0 may have waiting for targets (unlocked methods; locked ones keep one step
    # or one GPipe group). 0 = what the pipeline needs, about a target's round trip to stage 0:
    # K for true and lambda targets, 2 for bootstrap ones (core/pending.py derives it), capped
    # by pending_memory. A fixed small value throttles deep pipelines (2 caps the scale model
    # near 2.8x one device at any K); a larger one makes SG targets staler (benchmarks/RESULTS.md).
    max_in_flight: int = 0
    # Bytes the waiting steps of each unlocked stage may hold (a step's size is measured on the
    # first step): 0 = half the GPU's memory, or 1 GiB on a CPU. At stage 0 it bounds the
    # automatic in-flight limit; a stage above holds its next input while its budget is full.
    pending_memory: int = 0
    # gRPC transport: address to listen on (loopback unless told otherwise) and chunk size.
    grpc_bind: str = "127.0.0.1"
    chunk_bytes: int = 1 << 20
    # Test hook: stage ``slow_stage`` sleeps ``slow_seconds`` extra per input (-1 = none),
    # plus a uniform random jitter of up to ``slow_jitter`` seconds.
    slow_stage: int = -1
    slow_seconds: float = 0.0
    slow_jitter: float = 0.0
    # Emulated slow links (every stream): added one-way latency in seconds and a bandwidth
    # cap in bytes per second (0 = none), for benchmarks.
    link_latency: float = 0.0
    link_bandwidth: float = 0.0
    # Pipelined backprop (GPipe in the stage loop): micro-batches per optimiser step.
    micro_batches: int = 1
    # Fault tolerance: how often the driver restarts dead stage actors in one run.
    max_restarts: int = 3
    # Largest message (payload + labels) a stage accepts from the wire, in bytes.
    max_message_bytes: int = 1 << 30
    # Scheduling priority of the stage actors' processes. Ray starts its workers at nice 15
    # so that its own daemons stay responsive; a stage is the pipeline's critical path, and at
    # 15 any process at 0 (the driver, a data loader, a neighbour's job) takes its core first.
    niceness: int = 0
    # Pin each stage actor to cores of its own (engines/affinity.py): on, off, or auto = only
    # on a Ray this process started (no other job's Ray work shares its cores). Cores are
    # claimed by a lock file each in core_claims_dir ("" = the temp dir's dni-dist-cores),
    # so runs that share that directory never pin to the same core.
    pin_cpus: str = "auto"
    core_claims_dir: str = ""
    # A pinned stage's compute thread runs this much nicer than its link threads, so that a
    # link thread woken by a message runs at once instead of after the compute's time slice.
    # 0: it helped (+10%) while every CPU stage had Python link threads; since a CPU stage
    # with one inbound stream sends and receives on its own thread, it makes no difference
    # measurable here (RESULTS.md). For a middle stage's, or a GPU stage's, link threads.
    compute_nice_offset: int = 0
    # gRPC security: off loopback, TLS (PEM files) and a shared token are required. The
    # token is read from the environment variable named here, never from the config
    # (summary.json records the config).
    grpc_tls_cert: str | None = None
    grpc_tls_key: str | None = None
    grpc_tls_ca: str | None = None
    grpc_token_env: str = "DNI_GRPC_TOKEN"


@dataclass
class CheckpointConfig:
    """Periodic, atomic checkpoints of every stage (``dir`` unset = none)."""

    dir: str | None = None
    # Steps between checkpoints; 0 = at the end of every epoch.
    every: int = 0
    resume: bool = False
    # Checkpoints kept on disk (the newest ones).
    keep: int = 2


@dataclass
class TrainConfig:
    method: str = "sg"
    segments: int = 2
    cuts: list[int] | None = None
    # Without cuts: balance the segments by FLOPs per step, each stage's SG boundary included
    # ("cost"), or by parameter count ("params").
    balance: str = "cost"
    runtime: str = "local"
    # auto: shared memory (shm) when the CPU stages are placed on one node (an embedded Ray,
    # or one node of a cluster), else gloo; the run's summary.json says which
    # (engines/ray_engine.py, choose_transport).
    transport: str = "auto"
    epochs: int = 10
    seed: int = 0
    out: str = "runs/latest"
    update_prob: float = 1.0
    sg_prop_alpha: float = 1.0
    # method=fdg: FDG's gradient shrinking factor on the delayed gradient (pair with optim.name=sgd).
    fdg_shrink: float = 0.5
    log_every: int = 50
    # Prometheus endpoint served by the driver (0 = off).
    metrics_port: int = 0
    # auto: a live bar on a terminal, plain periodic lines otherwise (ray job logs).
    progress: str = "auto"
    # Non-finite losses, activations or gradients: the step is skipped and counted; this
    # many in a row stops the run (with a checkpoint).
    nan_limit: int = 3
    # fp32, or bf16: autocast forward passes, float32 master weights, bf16 on the wire
    # (core/precision.py). On a GPU, fp32 matrix products use TF32.
    precision: str = "fp32"
    # Weight copies a stage keeps for its pending steps' true gradients (true/lambda targets
    # above stage 0; ddg, fdg): 0 = one per pending step (exact); N = at most N, later steps
    # pass their gradient down through a recomputed forward under the current weights.
    stash_versions: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    sg: SGConfig = field(default_factory=SGConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS,
    "balance": BALANCES,
    "precision": PRECISIONS,
    "runtime": RUNTIMES,
    "transport": TRANSPORTS,
    "model.kind": MODEL_KINDS,
    "model.activation": tuple(ACTIVATIONS),
    "sg.kind": SG_KINDS,
    "sg.wrapper": WRAPPERS,
    "sg.target": TARGET_MODES,
    "sg.gate": GATES,
    "data.name": DATASETS,
    "data.loss": ("", "log", "mse"),
    "data.task": ("classification", "regression"),
    "data.labels": ("separable", "noisy", "random"),
    "optim.name": OPTIMIZERS,
    "dist.schedule": ("async", "lockstep"),
    "dist.placement": ("pack", "spread"),
    "dist.device": ("auto", "cpu", "cuda"),
    "dist.pin_cpus": ("auto", "on", "off"),
    "progress": ("auto", "bar", "lines", "off"),
}
# Longest wait a thread primitive accepts (threading.TIMEOUT_MAX is about 292 years on
# Linux but smaller elsewhere); longer timeouts would overflow deep inside a run.
_MAX_WAIT = min(1e7, threading.TIMEOUT_MAX)
# (low, high) inclusive; None = unbounded. Sizes are bounded too: a typo must not ask a
# plan for a matrix of terabytes.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "segments": (1, 64),
    "epochs": (1, 1 << 20),
    # Seeds are mixed into torch generator seeds (seed * 100_003 + epoch), which must fit 64 bits.
    "seed": (0, 2**31 - 1),
    "update_prob": (0.0, 1.0),
    "sg_prop_alpha": (0.0, None),
    "fdg_shrink": (1e-6, 1.0),
    "log_every": (1, None),
    "metrics_port": (0, 65535),
    "nan_limit": (1, None),
    "stash_versions": (0, 1 << 16),
    "sg.clip": (0.0, None),
    "sg.scale": (0.0, None),
    "model.depth": (0, 1000),
    "model.width": (1, 1 << 20),
    "model.channels": (1, 1 << 16),
    "model.heads": (1, 1 << 12),
    "sg.hidden": (1, 1 << 20),
    "sg.hidden_layers": (0, 16),
    "sg.rank": (1, 1 << 20),
    "sg.target_lambda": (0.0, 1.0),
    "sg.lr": (0.0, None),
    "sg.window": (1, 1 << 24),
    "sg.delay": (0, 1 << 20),
    "sg.reuse_lag": (0, 1 << 20),
    "sg.delay_lr": (0.0, None),
    "data.batch_size": (1, 1 << 24),
    "data.dim": (1, 1 << 20),
    "data.samples": (8, 1 << 26),
    "data.outputs": (1, 1 << 16),
    "data.context": (1, 1 << 16),
    "data.max_bytes": (2, 1 << 31),
    "optim.lr": (0.0, None),
    "optim.momentum": (0.0, 1.0),
    "optim.weight_decay": (0.0, None),
    "dist.num_cpus": (1, 1 << 20),
    "dist.cpus_per_stage": (0.01, 1024.0),
    "dist.timeout": (1.0, _MAX_WAIT),
    "dist.gpus_per_stage": (0.0, 1.0),
    "dist.scale_timeout": (1.0, _MAX_WAIT),
    "dist.capacity": (1, 4096),
    "dist.max_in_flight": (0, 4096),
    "dist.niceness": (0, 19),
    "dist.compute_nice_offset": (0, 19),
    "dist.pending_memory": (0, 1 << 50),
    "dist.chunk_bytes": (1024, 1 << 30),
    "dist.slow_stage": (-1, 64),
    "dist.slow_seconds": (0.0, 60.0),
    "dist.slow_jitter": (0.0, 60.0),
    "dist.link_latency": (0.0, 60.0),
    "dist.link_bandwidth": (0.0, None),
    "dist.micro_batches": (1, 4096),
    "dist.max_restarts": (0, 1000),
    "dist.max_message_bytes": (1024, 1 << 40),
    "checkpoint.every": (0, None),
    "checkpoint.keep": (1, None),
}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check one leaf value against its field type; YAML already parsed scalars."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
        origin = typing.get_origin(annotation)
    if origin is dict:
        return _mapping(key, value)
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{key}={value!r} must be a list of integers, e.g. {key}=[2,4]")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if annotation is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        try:
            number = float(value)
        except OverflowError:  # an integer literal beyond any float
            raise ConfigError(f"{key}={value} is too large for a number") from None
        if not math.isfinite(number):  # nan slips through every range comparison
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return number
    if annotation is str:
        if isinstance(value, bool):  # YAML reads `true` as a boolean; sg.target=true means the text
            # YAML 1.1 also reads on/off/yes/no as booleans: progress=off means the choice "off".
            words = ("true", "on", "yes") if value else ("false", "off", "no")
            return next((w for w in words if w in _CHOICES.get(key, ())), words[0])
        if isinstance(value, (int, float)):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")


def _mapping(key: str, value: Any) -> dict[str, Any]:
    """A factory's keyword arguments: names that Python accepts as keywords, any YAML values."""
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={value!r} must be a mapping of keyword arguments, e.g. {key}.width=64")
    for name, item in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{key}: {name!r} is not a keyword argument name")
        if not _plain(item):  # it goes into summary.json and saved models
            raise ConfigError(f"{key}.{name}={item!r} must be plain data: numbers, text, booleans, lists, mappings")
    return dict(value)


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _apply(target: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(target))
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in hints:
            allowed = ", ".join(f"{prefix}{f.name}" for f in dataclasses.fields(target))
            raise ConfigError(f"unknown config key {key!r}; known keys: {allowed}")
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a mapping of its fields, got {value!r}")
            _apply(current, value, prefix=f"{key}.")
        elif isinstance(current, dict):  # factory kwargs: each file or --set adds its keys
            setattr(target, name, {**current, **_coerce(key, value, hints[name])})
        else:
            setattr(target, name, _coerce(key, value, hints[name]))


def _check_grpc_security(dist: DistConfig) -> None:
    """Off loopback, stages must speak TLS (cert and key come together: _check_cross; the
    token is checked where transports start: it lives in the environment, which Ray workers
    inherit and the driver may not have)."""
    if not is_loopback(dist.grpc_bind) and dist.grpc_tls_cert is None:
        raise ConfigError(
            f"dist.grpc_bind={dist.grpc_bind} is not loopback: gRPC off loopback needs TLS "
            "(set dist.grpc_tls_cert and dist.grpc_tls_key) and a token in $" + dist.grpc_token_env
        )


def _check(config: TrainConfig) -> None:
    flat: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                flat[f"{prefix}{f.name}"] = value

    walk(config, "")
    for key, allowed in _CHOICES.items():
        if flat[key] not in allowed:
            shown = ", ".join(repr(a) if a == "" else a for a in allowed)
            raise ConfigError(f"{key}={flat[key]!r} is unknown; use one of {shown}")
    for key, (low, high) in _RANGES.items():
        value = flat[key]
        if value is None:
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
            raise ConfigError(f"{key}={value} is out of range; allowed {span}")
    _check_strings(flat)
    for section in ("model", "data"):
        factory, kwargs = flat[f"{section}.factory"], flat[f"{section}.kwargs"]
        if factory:
            check_spec(f"{section}.factory", factory)
        elif kwargs:
            raise ConfigError(f"{section}.kwargs={kwargs!r} needs {section}.factory: they are its keyword arguments")
    _check_cross(config)
    if config.transport == "grpc":
        _check_grpc_security(config.dist)
    if config.checkpoint.resume and not config.checkpoint.dir:
        raise ConfigError("checkpoint.resume=true needs checkpoint.dir (--checkpoint-dir DIR) to resume from")
    if config.cuts is not None and len(config.cuts) != config.segments - 1:
        raise ConfigError(f"cuts={config.cuts} needs segments={len(config.cuts) + 1}, got segments={config.segments}")


# String fields that name a file system path, a host or an environment variable; free text
# elsewhere is covered by _CHOICES.
_PATHS = ("out", "data.path", "checkpoint.dir", "dist.grpc_tls_cert", "dist.grpc_tls_key", "dist.grpc_tls_ca")
_HOST = re.compile(r"[A-Za-z0-9._:\-\[\]]+")
_ADDRESS = re.compile(r"\S+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Largest artificial data set (samples x dim floats) generated in memory: 256 MB.
_MAX_ARTIFICIAL_FLOATS = 1 << 26


def _check_strings(flat: dict[str, Any]) -> None:
    """Paths, hosts and names: non-empty, one line, and the right shape for what they name."""
    for key, value in flat.items():
        if isinstance(value, str) and any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ConfigError(f"{key}={value!r} contains a control character; remove it")
    for key in _PATHS:
        value = flat[key]
        if value is None:
            continue
        if not value.strip():
            raise ConfigError(f"{key}={value!r} is empty; give a path or leave it unset")
    for key in ("out", "checkpoint.dir"):  # directories this run creates
        if flat[key] is not None:
            # Stage actors on other nodes may write checkpoints where this node cannot.
            _check_creatable(key, flat[key], writable=key == "out")
    patterns = {"dist.grpc_bind": (_HOST, "a host name or IP address, e.g. 0.0.0.0")}
    patterns["dist.address"] = (_ADDRESS, "a Ray address such as auto, HOST:6379 or ray://HOST:10001")
    patterns["dist.grpc_token_env"] = (_ENV_NAME, "an environment variable name, e.g. DNI_GRPC_TOKEN")
    for key, (pattern, what) in patterns.items():
        value = flat[key]
        if value is not None and not pattern.fullmatch(value):
            raise ConfigError(f"{key}={value!r} is not {what}")


def _check_creatable(key: str, value: str, writable: bool) -> None:
    """A directory the run will create (or reuse): no file in the way and, if ``writable``,
    the nearest existing ancestor writable here. A failing mkdir deep in a run is a traceback."""
    path = Path(value)
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
        is_dir = existing.is_dir()
    except OSError as exc:  # e.g. a name too long for the file system
        raise ConfigError(f"{key}={value!r} is not a usable path ({exc.strerror or exc.__class__.__name__})") from None
    if not is_dir:
        what = "is an existing file" if existing == path else f"lies under the file {str(existing)!r}"
        raise ConfigError(f"{key}={value!r} {what}, not a directory; choose another path")
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={value!r}: {str(existing)!r} is not writable; choose another path")


def _check_cross(config: TrainConfig) -> None:
    """Constraints between fields that would otherwise fail deep inside a run. Those that
    need the model's shapes (cut points past the last block, SG kind per cut) are checked
    by dni_dist.operations.preflight, which plans the model."""
    if config.cuts is not None:
        cuts = config.cuts
        if any(c < 1 for c in cuts) or any(b <= a for a, b in itertools.pairwise(cuts)):
            raise ConfigError(f"cuts={cuts} must be strictly increasing block indices >= 1")
    if config.sg.delay and config.runtime != "local":
        raise ConfigError(
            f"sg.delay={config.sg.delay} emulates staleness on the local engine; with runtime={config.runtime} "
            "targets are as late as the pipeline makes them (set sg.delay=0)"
        )
    if config.sg.delay >= config.sg.window:
        raise ConfigError(
            f"sg.delay={config.sg.delay} needs sg.window > {config.sg.delay} (got {config.sg.window}): "
            "a step must still be kept when its target arrives"
        )
    d = config.dist
    if d.slow_stage >= config.segments:
        raise ConfigError(f"dist.slow_stage={d.slow_stage} names no stage; use -1..{config.segments - 1}")
    if d.device == "cpu" and (d.gpus_per_stage or config.transport == "nccl"):
        asked = f"dist.gpus_per_stage={d.gpus_per_stage:g}" if d.gpus_per_stage else "transport=nccl"
        raise ConfigError(f"dist.device=cpu but {asked} needs GPUs; use dist.device=cuda or auto")
    if config.transport == "nccl" and 0 < d.gpus_per_stage < 1:
        raise ConfigError(
            f"dist.gpus_per_stage={d.gpus_per_stage:g}: transport=nccl needs a whole GPU per stage; use 1 or gloo"
        )
    if (d.grpc_tls_cert is None) != (d.grpc_tls_key is None):
        raise ConfigError(
            f"dist.grpc_tls_cert={d.grpc_tls_cert!r} and dist.grpc_tls_key={d.grpc_tls_key!r}: give both or neither"
        )
    batch = config.data.batch_size
    # Batch norm in training mode needs two examples per batch: one alone has no variance.
    # (With dist.micro_batches every step is still a whole data.batch_size batch.)
    m = config.model
    model_bn = not m.factory and m.kind == "mlp" and m.batch_norm and m.depth > 0
    model_bn = model_bn or (not m.factory and m.kind == "resnet")  # batch norm in every block
    sg_bn = config.method in ("sg", "sg-prop") and config.sg.kind == "mlp" and config.sg.hidden_layers > 0
    if (model_bn or sg_bn) and batch < 2:
        model_why = (
            "model.kind=resnet (batch norm in every block)"
            if config.model.kind == "resnet"
            else "model.batch_norm=true"
        )
        where = model_why if model_bn else "sg.kind=mlp (its hidden layers use batch norm)"
        raise ConfigError(f"data.batch_size={batch} is too small for {where}; use 2 or more")
    data = config.data
    if data.name == "artificial":
        if data.task == "regression" and data.loss == "log":
            raise ConfigError("data.loss='log' needs data.task=classification; use data.loss=mse or leave it unset")
        if data.task == "classification" and data.outputs > 2:
            raise ConfigError(f"data.outputs={data.outputs}: artificial classification is binary; use 1 or 2")
        if data.grid and data.dim != 2:
            raise ConfigError(f"data.grid=true needs data.dim=2, got data.dim={data.dim}")
        if data.samples * data.dim > _MAX_ARTIFICIAL_FLOATS:
            raise ConfigError(
                f"data.samples={data.samples} x data.dim={data.dim} exceeds {_MAX_ARTIFICIAL_FLOATS} values; "
                "lower one of them"
            )


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value). Values are read as YAML scalars."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r} must look like key=value, e.g. --set sg.kind=mlp")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc.__class__.__name__})") from None
    return key.strip().split("."), value


def load_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then each override in order; then validate all."""
    config = TrainConfig()
    if path is not None:
        file = Path(path)
        try:
            found = file.is_file()
        except OSError:  # a name too long for the file system, say
            found = False
        if not found:
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path!r} cannot be read ({exc.__class__.__name__}); check it") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file {path!r} is not valid YAML{where}; fix its syntax") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of keys, got {type(data).__name__}")
        _apply(config, data or {})
    for text in overrides or []:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _apply(config, nested)
    _check(config)
    return config


def config_from(values: Mapping[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """``base`` (or the defaults) updated by a nested mapping of keys, as a YAML file would
    be (``{"segments": 3, "sg": {"kind": "mlp"}}``); then validate all. For Python callers."""
    config = copy.deepcopy(base) if base is not None else TrainConfig()
    _apply(config, dict(values))
    _check(config)
    return config
