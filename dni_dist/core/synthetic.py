"""Synthetic-gradient (SG) modules: small models that predict dL/dh at a cut.

Every SG has the same form (NOTES.md, "SG for log loss"):

    SG(h, y) = scale * (wrap(core(h, y)) + y B + C)

``core`` is linear (h A), low-rank linear (h U V), an MLP or a small conv net; ``wrap`` is
identity, sigmoid or softmax (the pointwise nonlinearity that lets an SG represent the
log-loss gradient softmax(s) - y exactly); ``y B`` is present only when the SG is
conditioned on the labels (cDNI). The last trainable layer of ``core`` and ``B`` start at
zero and ``C`` starts at ``-wrap(0)``, so every SG outputs exactly zero before training,
as in the DNI paper.

SG outputs are *per-example* gradients (dl_i/dh_i of the per-example loss); the boundary
methods divide by the batch size when driving the network. That keeps what an SG learns
independent of the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from dni_dist.errors import ConfigError

SGKind = Literal["linear", "lowrank", "mlp", "conv"]
Wrapper = Literal["none", "sigmoid", "softmax"]
SG_KINDS: tuple[str, ...] = ("linear", "lowrank", "mlp", "conv")
WRAPPERS: tuple[str, ...] = ("none", "sigmoid", "softmax")


@dataclass
class SGSpec:
    """What SG to put at a cut; shapes come from the model, not from here."""

    kind: str = "linear"
    conditioned: bool = True
    wrapper: str = "none"
    hidden: int = 256
    hidden_layers: int = 2
    rank: int = 16
    scale: float = 1.0


def _wrap(wrapper: str, z: torch.Tensor) -> torch.Tensor:
    if wrapper == "sigmoid":
        return torch.sigmoid(z)
    if wrapper == "softmax":
        return torch.softmax(z, dim=1)
    return z


class SyntheticGradient(nn.Module):
    """Base class: ``forward(h, context)`` returns a per-example gradient shaped like h."""

    def __init__(
        self,
        core: nn.Module,
        feature_shape: tuple[int, ...],
        context_dim: int,
        conditioned: bool,
        wrapper: str,
        scale: float,
    ) -> None:
        super().__init__()
        if wrapper not in WRAPPERS:
            raise ConfigError(f"sg.wrapper={wrapper!r} is unknown; use one of {', '.join(WRAPPERS)}")
        self.core = core
        self.feature_shape = tuple(feature_shape)
        self.conditioned = conditioned
        self.wrapper = wrapper
        self.scale = scale
        numel = math.prod(self.feature_shape)
        self.label = nn.Linear(context_dim, numel, bias=False) if conditioned else None
        if self.label is not None:
            nn.init.zeros_(self.label.weight)
        # C starts at -wrap(0) so the whole SG outputs zero before it is trained.
        start = -_wrap(wrapper, torch.zeros(1, *self.feature_shape))[0]
        self.bias = nn.Parameter(start.clone())

    @property
    def fits_kept_outputs(self) -> bool:
        """Can an output made before the SG's optimiser steps still train it afterwards?
        Yes for one layer between h (and the labels) and the output: each parameter's
        gradient then needs only the layer's inputs, which do not change. With more layers
        the backward pass reads the later layers' weights, which the steps changed in place
        (autograd refuses), and a batch-norm SG's forward moves its statistics."""
        return getattr(self.core, "single_layer", False) and not list(self.buffers())

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if tuple(h.shape[1:]) != self.feature_shape:
            raise ValueError(
                f"SG expects activations of shape (batch, {', '.join(map(str, self.feature_shape))}), "
                f"got {tuple(h.shape)}"
            )
        out = _wrap(self.wrapper, self.core(h, context)) + self.bias
        if self.label is not None:
            out = out + self.label(context).view(-1, *self.feature_shape)
        return out if self.scale == 1.0 else self.scale * out  # no kernel (and no grad node) for 1


class TokenSyntheticGradient(SyntheticGradient):
    """An SG for sequence activations (batch, T, W), applied to each token on its own: the
    per-token SG maps h_t (W values) to a gradient for h_t, with the same weights at every
    position. Conditioned, token t's context is its integer target y_t (the next token),
    one-hot over the vocabulary, exactly as a class label conditions the flat SG: the label
    term y_t B is then row y_t of B, a learned embedding of the target."""

    def __init__(
        self, core: nn.Module, positions: int, width: int, vocab: int, conditioned: bool, wrapper: str, scale: float
    ) -> None:
        super().__init__(core, (width,), vocab, conditioned, wrapper, scale)
        self.positions = positions
        self.vocab = vocab

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        width = self.feature_shape[0]
        if h.dim() != 3 or tuple(h.shape[1:]) != (self.positions, width):
            raise ValueError(
                f"SG expects activations of shape (batch, {self.positions}, {width}), got {tuple(h.shape)}"
            )
        tokens = h.reshape(-1, width)
        if self.conditioned:
            labels = F.one_hot(context.reshape(-1).long(), self.vocab).to(h.dtype)
        else:  # the cores ignore the context when unconditioned
            labels = tokens.new_zeros(len(tokens), 0)
        return super().forward(tokens, labels).view_as(h)


class _LinearCore(nn.Module):
    """z = flatten(h) A, A zero-initialised."""

    single_layer = True

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.A = nn.Linear(numel, numel, bias=False)
        nn.init.zeros_(self.A.weight)

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.A(h.flatten(1)).view_as(h)


class _LowRankCore(nn.Module):
    """z = flatten(h) U V with rank r: O(d r) instead of O(d^2) parameters and work."""

    def __init__(self, numel: int, rank: int) -> None:
        super().__init__()
        self.U = nn.Linear(numel, rank, bias=False)
        self.V = nn.Linear(rank, numel, bias=False)
        nn.init.zeros_(self.V.weight)

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.V(self.U(h.flatten(1))).view_as(h)


class _MLPCore(nn.Module):
    """The DNI paper's fully-connected SG: (Linear, BatchNorm, ReLU) x n, zero-init Linear."""

    def __init__(self, numel: int, context_dim: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.context_dim = context_dim
        self.single_layer = layers == 0
        blocks: list[nn.Module] = []
        width = numel + context_dim
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
            width = hidden
        out = nn.Linear(width, numel)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*blocks, out)

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = h.flatten(1)
        if self.context_dim:
            x = torch.cat([x, context], dim=1)
        return self.net(x).view_as(h)


class _ConvCore(nn.Module):
    """The DNI paper's conv SG: 3 conv layers, labels as extra constant channels."""

    def __init__(self, channels: int, context_dim: int, hidden: int) -> None:
        super().__init__()
        self.context_dim = context_dim
        c_in = channels + context_dim
        last = nn.Conv2d(hidden, channels, 5, padding=2)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(
            nn.Conv2d(c_in, hidden, 5, padding=2),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 5, padding=2),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            last,
        )

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = h
        if self.context_dim:
            planes = context[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])
            x = torch.cat([h, planes], dim=1)
        return self.net(x)


def build_sg(
    spec: SGSpec, feature_shape: tuple[int, ...], context_dim: int, where: str = "", positions: int = 0
) -> SyntheticGradient:
    """Build the SG a spec asks for at a cut whose activations are (batch, *feature_shape).

    ``positions`` > 0: a token-level task with that many positions, whose context is the
    integer targets (batch, positions) over ``context_dim`` token values; the SG is then
    applied per token (``TokenSyntheticGradient``) to activations (batch, positions, W)."""
    at = f" at {where}" if where else ""
    if positions:
        if len(feature_shape) != 2 or feature_shape[0] != positions:
            raise ConfigError(
                f"a per-token SG needs activations (T={positions}, W){at}, got shape {tuple(feature_shape)}; "
                "cut the model where every position has its own vector"
            )
        if spec.kind == "conv":
            raise ConfigError(
                f"sg.kind='conv' needs a feature map{at}; per-token activations take linear, lowrank or mlp"
            )
        token = build_sg(spec, feature_shape[1:], context_dim, where)
        return TokenSyntheticGradient(
            token.core, positions, feature_shape[1], context_dim, spec.conditioned, spec.wrapper, spec.scale
        )
    numel = math.prod(feature_shape)
    ctx = context_dim if spec.conditioned else 0
    if spec.kind == "linear":
        core: nn.Module = _LinearCore(numel)
    elif spec.kind == "lowrank":
        if not 1 <= spec.rank <= numel:
            raise ConfigError(f"sg.rank={spec.rank} is out of range{at}: use 1..{numel} (the activation size)")
        core = _LowRankCore(numel, spec.rank)
    elif spec.kind == "mlp":
        if spec.hidden < 1 or spec.hidden_layers < 0:
            raise ConfigError(
                f"sg.hidden={spec.hidden}, sg.hidden_layers={spec.hidden_layers}: need hidden >= 1, layers >= 0"
            )
        core = _MLPCore(numel, ctx, spec.hidden, spec.hidden_layers)
    elif spec.kind == "conv":
        if len(feature_shape) != 3:
            raise ConfigError(
                f"sg.kind='conv' needs a feature map (C, H, W){at}, got activations of shape "
                f"{tuple(feature_shape)}; use sg.kind=linear, lowrank or mlp there"
            )
        core = _ConvCore(feature_shape[0], ctx, spec.hidden)
    else:
        raise ConfigError(f"sg.kind={spec.kind!r} is unknown; use one of {', '.join(SG_KINDS)}")
    if spec.wrapper == "softmax" and len(feature_shape) != 1:
        raise ConfigError(f"sg.wrapper='softmax' needs flat activations{at}, got shape {tuple(feature_shape)}")
    return SyntheticGradient(core, feature_shape, context_dim, spec.conditioned, spec.wrapper, spec.scale)
