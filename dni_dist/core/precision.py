"""Numeric precision of a stage: ``fp32`` or ``bf16`` (the config's ``precision``).

With ``bf16`` the segment's forward pass, the SG's forward pass and its training run under
``torch.autocast`` in bfloat16, while parameters, gradients and optimiser state stay
float32 (master weights: small updates are not lost to bf16's 8-bit mantissa). Activations
and gradients travel between stages in the stage's precision, halving the wire's bytes;
each stream's dtype is part of its description (``messages.Stream``) and of the gRPC
handshake. Losses, SG losses and cosines are computed in float32.

With ``fp32`` on a CUDA device, matrix products use TF32 tensor cores (PyTorch's "high"
float32 matmul precision): about 10 mantissa bits in the products, float32 accumulation.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
_WIRE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def wire_dtype(precision: str) -> torch.dtype:
    """The dtype of activations and gradients a stage of this precision sends."""
    if precision not in _WIRE:
        raise ValueError(f"precision={precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    return _WIRE[precision]


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a stage's forward passes run in: bf16 autocast on ``device``, or nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def enable_tf32(device: torch.device) -> None:
    """TF32 for float32 matrix products and convolutions on a CUDA device (process-wide)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
