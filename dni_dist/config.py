"""Run configuration as plain dataclasses, loaded from YAML and ``--set key=value``.

Every field is typed and checked here, so a bad value fails before anything starts,
with one line naming the field, the value and what is allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dni_dist.data import DATASETS
from dni_dist.errors import ConfigError
from dni_dist.methods import METHODS
from dni_dist.models import ACTIVATIONS, MODEL_KINDS, ModelSpec
from dni_dist.stage import TARGET_MODES
from dni_dist.synthetic import SG_KINDS, WRAPPERS, SGSpec

RUNTIMES = ("local", "ray")
TRANSPORTS = ("gloo", "nccl", "grpc")
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
    timeout: float = 300.0
    capacity: int = 4
    # Steps stage 0 may have waiting for targets (unlocked methods). More lets deep pipelines
    # run fuller but makes SG targets staler: on digits a 4-step target delay costs about 10
    # points of accuracy, 8 steps diverge (see benchmarks/RESULTS.md). 2 keeps two stages
    # working at once with targets at most about one step old.
    max_in_flight: int = 2
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
    runtime: str = "local"
    transport: str = "gloo"
    epochs: int = 10
    seed: int = 0
    out: str = "runs/latest"
    update_prob: float = 1.0
    sg_prop_alpha: float = 1.0
    log_every: int = 50
    # Prometheus endpoint served by the driver (0 = off).
    metrics_port: int = 0
    # auto: a live bar on a terminal, plain periodic lines otherwise (ray job logs).
    progress: str = "auto"
    # Non-finite losses, activations or gradients: the step is skipped and counted; this
    # many in a row stops the run (with a checkpoint).
    nan_limit: int = 3
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
    "runtime": RUNTIMES,
    "transport": TRANSPORTS,
    "model.kind": MODEL_KINDS,
    "model.activation": tuple(ACTIVATIONS),
    "sg.kind": SG_KINDS,
    "sg.wrapper": WRAPPERS,
    "sg.target": TARGET_MODES,
    "data.name": DATASETS,
    "data.loss": ("", "log", "mse"),
    "data.task": ("classification", "regression"),
    "data.labels": ("separable", "noisy", "random"),
    "optim.name": OPTIMIZERS,
    "dist.schedule": ("async", "lockstep"),
    "dist.placement": ("pack", "spread"),
    "progress": ("auto", "bar", "lines", "off"),
}
# (low, high) inclusive; None = unbounded.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "segments": (1, 64),
    "epochs": (1, None),
    "update_prob": (0.0, 1.0),
    "sg_prop_alpha": (0.0, None),
    "log_every": (1, None),
    "metrics_port": (0, 65535),
    "nan_limit": (1, None),
    "sg.clip": (0.0, None),
    "model.depth": (0, 1000),
    "model.width": (1, None),
    "model.channels": (1, None),
    "sg.hidden": (1, None),
    "sg.hidden_layers": (0, 16),
    "sg.rank": (1, None),
    "sg.target_lambda": (0.0, 1.0),
    "sg.lr": (0.0, None),
    "sg.window": (1, None),
    "data.batch_size": (1, None),
    "data.dim": (1, None),
    "data.samples": (8, None),
    "data.outputs": (1, None),
    "optim.lr": (0.0, None),
    "optim.momentum": (0.0, 1.0),
    "optim.weight_decay": (0.0, None),
    "dist.num_cpus": (1, None),
    "dist.cpus_per_stage": (0.01, None),
    "dist.timeout": (1.0, None),
    "dist.capacity": (1, 4096),
    "dist.max_in_flight": (1, 4096),
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
        return float(value)
    if annotation is str:
        if isinstance(value, bool):  # YAML reads `true` as a boolean; sg.target=true means the text
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")


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
        else:
            setattr(target, name, _coerce(key, value, hints[name]))


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_grpc_security(dist: DistConfig) -> None:
    """Off loopback, stages must speak TLS (the token is checked where transports start:
    it lives in the environment, which Ray workers inherit and the driver may not have)."""
    if (dist.grpc_tls_cert is None) != (dist.grpc_tls_key is None):
        have, lack = ("cert", "key") if dist.grpc_tls_key is None else ("key", "cert")
        raise ConfigError(f"dist.grpc_tls_{have} is set without dist.grpc_tls_{lack}; TLS needs both PEM files")
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
    if config.transport == "grpc":
        _check_grpc_security(config.dist)
    if config.checkpoint.resume and not config.checkpoint.dir:
        raise ConfigError("checkpoint.resume=true needs checkpoint.dir (--checkpoint-dir DIR) to resume from")
    if config.cuts is not None and len(config.cuts) != config.segments - 1:
        raise ConfigError(f"cuts={config.cuts} needs segments={len(config.cuts) + 1}, got segments={config.segments}")


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
        if not file.is_file():
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            data = yaml.safe_load(file.read_text())
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
