"""A user's model: ``model.factory = "package.module:function"`` with ``model.kwargs``.

The function is called as ``function(input_shape, n_outputs, **kwargs)`` and returns an
``nn.Sequential`` whose children are the blocks cuts may fall between (or a list of
blocks, wrapped here). Everything a run relies on is checked here, once, with a one-line
ConfigError naming the spec: the return type, and a dry forward of two examples through
the blocks in order (on the meta device during pre-flight, so it costs nothing there) so
that a block that does not fit its predecessor is named before any stage is built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dni_dist.core.imports import resolve
from dni_dist.errors import ConfigError

KEY = "model.factory"


def build_from_factory(
    spec: str,
    kwargs: Mapping[str, Any],
    input_shape: tuple[int, ...],
    n_outputs: int,
    fallback_paths: Sequence[str] = (),
) -> nn.Sequential:
    function = resolve(KEY, spec, fallback_paths)
    try:
        built = function(tuple(input_shape), n_outputs, **kwargs)
    except Exception as exc:  # often kwargs the function does not take; the traceback is the user's to rerun
        raise ConfigError(
            f"{KEY}={spec!r} with model.kwargs={dict(kwargs)!r} raised {type(exc).__name__}: {_line(exc)}"
        ) from None
    model = _as_sequential(spec, built)
    check_blocks(spec, model, input_shape, n_outputs)
    return model


def _as_sequential(spec: str, built: Any) -> nn.Sequential:
    if isinstance(built, nn.Sequential):
        blocks = list(built.children())
        model = built
    elif isinstance(built, (list, tuple)):
        blocks = list(built)
        model = None
    else:
        raise ConfigError(
            f"{KEY}={spec!r} returned a {type(built).__name__}; return an nn.Sequential of blocks or a list of blocks"
        )
    for i, block in enumerate(blocks):
        if not isinstance(block, nn.Module):
            raise ConfigError(f"{KEY}={spec!r}: block {i} is a {type(block).__name__}, not an nn.Module")
    if not blocks:
        raise ConfigError(f"{KEY}={spec!r} returned no blocks; a model needs at least one")
    return model if model is not None else nn.Sequential(*blocks)


def check_blocks(spec: str, model: nn.Sequential, input_shape: tuple[int, ...], n_outputs: int) -> None:
    """Run two examples through the blocks in order; name the first block that cannot take
    its input, or an output that is not (batch, n_outputs)."""
    first = next(model.parameters(), None)
    device = first.device if first is not None else None  # None: the default (meta in pre-flight)
    modes = [m.training for m in model.modules()]
    model.eval()  # a dry run must not move batch-norm statistics
    try:
        with torch.no_grad():
            h = torch.zeros(2, *input_shape, device=device)
            for i, block in enumerate(model):
                shape = tuple(h.shape[1:])
                try:
                    h = block(h)
                except Exception as exc:
                    if h.is_meta and isinstance(exc, NotImplementedError):
                        return  # an op without a meta kernel: the real build (on a device) checks the rest
                    where = "the input" if i == 0 else f"block {i - 1}'s output"
                    raise ConfigError(
                        f"{KEY}={spec!r}: block {i} ({type(block).__name__}) does not take {where} of shape "
                        f"{shape}: {_line(exc)}"
                    ) from None
                if not isinstance(h, torch.Tensor):
                    raise ConfigError(f"{KEY}={spec!r}: block {i} returned a {type(h).__name__}, not a tensor")
    finally:
        for module, mode in zip(model.modules(), modes, strict=True):
            module.training = mode
    if tuple(h.shape) != (2, n_outputs):
        raise ConfigError(
            f"{KEY}={spec!r}: the last block outputs shape {tuple(h.shape[1:])} per example; "
            f"the task needs ({n_outputs},)"
        )


def _line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
