"""Models as ``nn.Sequential`` of blocks; a cut may fall between any two blocks.

A block is the smallest unit a cut respects (e.g. Linear + BatchNorm + ReLU), so a cut
never separates a layer from its normalisation or nonlinearity.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dni_dist.errors import ConfigError
from dni_dist.models.factory import build_from_factory
from dni_dist.models.resnet import build_resnet
from dni_dist.models.transformer import build_transformer

MODEL_KINDS: tuple[str, ...] = ("mlp", "linear", "deep_linear", "cnn", "transformer", "resnet")
ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


@dataclass
class ModelSpec:
    """The model to build; also the ``model`` section of the run config."""

    kind: str = "mlp"
    depth: int = 3
    width: int = 256
    activation: str = "relu"
    batch_norm: bool = False
    channels: int = 32
    # A user's model instead of ``kind`` (models/factory.py): "package.module:function",
    # called as function(input_shape, n_outputs, **kwargs).
    factory: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    # transformer: attention heads per block (model.width must be a multiple). Its context
    # length is the data's (data.context), its vocabulary the task's.
    heads: int = 4


def build_model(spec: ModelSpec, input_shape: tuple[int, ...], n_outputs: int) -> nn.Sequential:
    """Build the model for inputs of shape (batch, *input_shape)."""
    if spec.factory:
        return build_from_factory(spec.factory, spec.kwargs, input_shape, n_outputs)
    if spec.activation not in ACTIVATIONS:
        raise ConfigError(f"model.activation={spec.activation!r} is unknown; use one of {', '.join(ACTIVATIONS)}")
    if spec.depth < 0 or spec.width < 1:
        raise ConfigError(f"model.depth={spec.depth}, model.width={spec.width}: need depth >= 0 and width >= 1")
    n_in = math.prod(input_shape)
    if spec.kind == "mlp":
        return _mlp(spec, n_in, n_outputs)
    if spec.kind == "linear":
        return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(n_in, n_outputs)))
    if spec.kind == "deep_linear":
        widths = [n_in] + [spec.width] * spec.depth + [n_outputs]
        blocks = [nn.Sequential(nn.Linear(a, b)) for a, b in itertools.pairwise(widths)]
        blocks[0].insert(0, nn.Flatten())
        return nn.Sequential(*blocks)
    if spec.kind == "cnn":
        return _cnn(spec, input_shape, n_outputs)
    if spec.kind == "transformer":
        return build_transformer(spec.depth, spec.width, spec.heads, input_shape, n_outputs)
    if spec.kind == "resnet":
        return build_resnet(spec.depth, spec.channels, input_shape, n_outputs)
    raise ConfigError(f"model.kind={spec.kind!r} is unknown; use one of {', '.join(MODEL_KINDS)}")


def _mlp(spec: ModelSpec, n_in: int, n_outputs: int) -> nn.Sequential:
    blocks: list[nn.Module] = []
    width_in = n_in
    for i in range(spec.depth):
        layers: list[nn.Module] = [nn.Flatten()] if i == 0 else []
        layers.append(nn.Linear(width_in, spec.width))
        if spec.batch_norm:
            layers.append(nn.BatchNorm1d(spec.width))
        layers.append(ACTIVATIONS[spec.activation]())
        blocks.append(nn.Sequential(*layers))
        width_in = spec.width
    head: list[nn.Module] = [] if spec.depth else [nn.Flatten()]
    blocks.append(nn.Sequential(*head, nn.Linear(width_in, n_outputs)))
    return nn.Sequential(*blocks)


def _cnn(spec: ModelSpec, input_shape: tuple[int, ...], n_outputs: int) -> nn.Sequential:
    if len(input_shape) != 3:
        raise ConfigError(f"model.kind='cnn' needs image inputs (C, H, W), got input shape {tuple(input_shape)}")
    channels, height, width = input_shape
    if min(height, width) < 4:
        raise ConfigError(f"model.kind='cnn' needs images of at least 4x4, got {height}x{width}")
    act = ACTIVATIONS[spec.activation]
    c = spec.channels
    blocks: list[nn.Module] = []
    for c_in, c_out in ((channels, c), (c, 2 * c)):
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1)]
        if spec.batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers += [act(), nn.MaxPool2d(2)]
        blocks.append(nn.Sequential(*layers))
    flat = 2 * c * (height // 4) * (width // 4)
    blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(flat, spec.width), act()))
    blocks.append(nn.Sequential(nn.Linear(spec.width, n_outputs)))
    return nn.Sequential(*blocks)
