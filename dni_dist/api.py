"""Training from Python: ``dni_dist.fit`` and the saved-model format.

``fit`` is ``dni-dist train`` for scripts and notebooks: the same config keys, the same
runner (so the same checks, engines, metrics and summary.json), with the model and the data
given as Python objects. It returns the summary and the trained network reassembled into
one ``nn.Sequential`` (the stages' segments, in order), which ``save`` writes as a plain
file that ``load_model`` rebuilds from the model's factory (or zoo spec) alone: no
engine, SG or config is needed to run it. Format: docs/user-code.md.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dni_dist.builder import plan_model, with_loss
from dni_dist.config import TrainConfig, config_from, load_config
from dni_dist.core.feedback import to_feedback_alignment
from dni_dist.core.imports import spec_of
from dni_dist.core.tasks import Task
from dni_dist.data import Dataset
from dni_dist.data.factory import as_dataset
from dni_dist.errors import ConfigError
from dni_dist.models import ModelSpec, build_model
from dni_dist.runner import run

FORMAT = "dni_dist.model"
VERSION = 1


@dataclass
class Fitted:
    """A trained run: ``summary`` (what summary.json holds) and ``network``, the whole model
    in eval mode, whose state_dict keys are those of the factory's ``nn.Sequential``."""

    summary: dict[str, Any]
    network: nn.Sequential
    model: ModelSpec
    input_shape: tuple[int, ...]
    task: Task
    method: str

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The network's outputs for ``x`` (logits for classification)."""
        self.network.eval()
        with torch.no_grad():
            return self.network(x)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write what ``load_model`` needs: the model spec, the shapes and the weights."""
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "model": dataclasses.asdict(self.model),
            "input_shape": list(self.input_shape),
            "task": {"kind": self.task.kind, "n_outputs": self.task.n_outputs, "loss": self.task.loss_name},
            "feedback_alignment": self.method == "fa",
            "state_dict": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
        }
        torch.save(payload, Path(path))


def load_model(path: str | os.PathLike[str]) -> nn.Sequential:
    """The network ``Fitted.save`` wrote, rebuilt from its factory (which must be importable
    here) or zoo spec, with its trained weights, in eval mode."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise ConfigError(f"model file {str(path)!r} cannot be read ({exc.__class__.__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"model file {str(path)!r} is not a dni_dist model (saved by Fitted.save)")
    if payload.get("version") != VERSION:
        raise ConfigError(f"model file {str(path)!r} has format version {payload.get('version')}; expected {VERSION}")
    spec = ModelSpec(**payload["model"])
    network = build_model(spec, tuple(payload["input_shape"]), payload["task"]["n_outputs"])
    if payload["feedback_alignment"]:  # same layers, plus the fixed feedback matrices it was trained with
        to_feedback_alignment(network, seed=0)
    network.load_state_dict(payload["state_dict"])
    return network.eval()


ModelArg = str | Callable[..., Any] | None
DataArg = str | Callable[..., Any] | Dataset | tuple | list | Mapping[str, Any] | None


def fit(
    model: ModelArg = None,
    data: DataArg = None,
    *,
    config: TrainConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    data_kwargs: Mapping[str, Any] | None = None,
    verbose: bool = False,
    **overrides: Any,
) -> Fitted:
    """Train ``model`` on ``data`` and return the summary and the trained network.

    ``model``: a factory ``function(input_shape, n_outputs, **model_kwargs)`` (a module-level
    function or its ``"module:function"`` spec), or None for the config's model.
    ``data``: a data factory ``function(**data_kwargs)`` (or its spec), the data itself
    (``(x_train, y_train, x_test, y_test)``, a mapping with those keys or a Dataset), or
    None for the config's data. ``config``: a TrainConfig, a nested mapping or a YAML file;
    ``overrides``: top-level config keys, a mapping for a section (``segments=3,
    runtime="ray", sg={"kind": "mlp"}``). On runtime="ray" the factories must be importable
    by the stage actors (docs/user-code.md).
    """
    base = _base_config(config)
    values: dict[str, Any] = dict(overrides)
    sections: dict[str, dict[str, Any]] = {"model": {}, "data": {}}
    if model is not None:
        sections["model"]["factory"] = model if isinstance(model, str) else spec_of("model", model)
    if model_kwargs is not None:
        sections["model"]["kwargs"] = dict(model_kwargs)
    in_memory: Dataset | None = None
    if isinstance(data, str) or (callable(data) and not isinstance(data, Dataset)):
        sections["data"]["factory"] = data if isinstance(data, str) else spec_of("data", data)
    elif data is not None:
        in_memory = as_dataset(data, name="in-memory", where="data")
    if data_kwargs is not None:
        sections["data"]["kwargs"] = dict(data_kwargs)
    for name, section in sections.items():
        if section:
            given = values.pop(name, {})
            if not isinstance(given, Mapping):
                raise ConfigError(f"{name}={given!r}: pass the {name} section as a mapping, or use the {name} argument")
            values[name] = {**given, **section}
    cfg = config_from(values, base)
    if cfg.runtime == "ray":
        for key, spec in (("model", cfg.model.factory), ("data", cfg.data.factory)):
            if spec.startswith("__main__:"):
                raise ConfigError(
                    f"{key}.factory={spec!r} is defined in __main__, which Ray's stage actors cannot import; "
                    "move it to a module (a .py file beside the script)"
                )
    dataset = with_loss(cfg, in_memory) if in_memory is not None else None
    trained = run(cfg, verbose, dataset, keep_segments=True)
    assert trained.segment_states is not None
    network = _reassemble(cfg, trained.dataset, trained.segment_states)
    task = trained.dataset.task
    return Fitted(trained.summary, network, cfg.model, trained.dataset.input_shape, task, cfg.method)


def _base_config(config: TrainConfig | Mapping[str, Any] | str | os.PathLike[str] | None) -> TrainConfig:
    if config is None:
        return TrainConfig()
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, Mapping):
        return config_from(config)
    if isinstance(config, (str, os.PathLike)):
        return load_config(os.fspath(config))
    raise ConfigError(f"config={config!r} must be a TrainConfig, a mapping of keys or a YAML file's path")


def _reassemble(config: TrainConfig, dataset: Dataset, states: list[dict[str, torch.Tensor]]) -> nn.Sequential:
    """One nn.Sequential of every block, in order, with each stage's trained weights."""
    with torch.random.fork_rng(devices=[]):  # planning seeds the generator; the caller's stays as it was
        plan = plan_model(config, dataset.input_shape, dataset.task)
    for segment, state in zip(plan.segments, states, strict=True):
        segment.load_state_dict(state)
    return nn.Sequential(*(block for segment in plan.segments for block in segment)).eval()
