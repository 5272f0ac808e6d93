"""Feedback alignment (Lillicrap et al.): layers whose backward pass uses a fixed random
matrix B in place of the transpose of their weight.

Forward is the ordinary layer. Backward: dL/dx = dL/dy B (not dL/dy W), while the weight
gradient stays dL/dy^T x. ``to_feedback_alignment`` swaps every Linear/Conv2d of a model
for its FA twin (same parameters), so the error that reaches a cut is FA's random-feedback
chain rather than backprop's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class _FALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, feedback: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, feedback = ctx.saved_tensors
        # Under bf16 autocast the error arrives in bf16: compute in its dtype (autograd casts
        # each gradient back to its input's dtype).
        x, feedback = x.to(grad_out.dtype), feedback.to(grad_out.dtype)
        grad_x = grad_out @ feedback
        grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


class _FAConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        feedback: torch.Tensor,
        stride: Any,
        padding: Any,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        ctx.conf = (stride, padding, weight.shape)
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, feedback = ctx.saved_tensors
        x, feedback = x.to(grad_out.dtype), feedback.to(grad_out.dtype)  # bf16 autocast, as above
        stride, padding, w_shape = ctx.conf
        grad_x = torch.nn.grad.conv2d_input(x.shape, feedback, grad_out, stride, padding)
        grad_w = torch.nn.grad.conv2d_weight(x, w_shape, grad_out, stride, padding)
        grad_b = grad_out.sum((0, 2, 3)) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None, None


class FALinear(nn.Linear):
    """nn.Linear whose input gradient goes through the fixed buffer ``feedback``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, generator: torch.Generator) -> None:
        super().__init__(in_features, out_features, bias)
        scale = in_features**-0.5
        self.register_buffer("feedback", torch.randn(out_features, in_features, generator=generator) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FALinearFn.apply(x, self.weight, self.bias, self.feedback)


class FAConv2d(nn.Conv2d):
    """nn.Conv2d whose input gradient goes through the fixed buffer ``feedback``."""

    def __init__(self, conv: nn.Conv2d, generator: torch.Generator) -> None:
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
        )
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        self.register_buffer("feedback", torch.randn(self.weight.shape, generator=generator) * fan_in**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FAConv2dFn.apply(x, self.weight, self.bias, self.feedback, self.stride, self.padding)


def to_feedback_alignment(model: nn.Module, seed: int) -> nn.Module:
    """Replace every Linear/Conv2d in ``model`` (in place) by its FA twin with the same weights."""
    generator = torch.Generator().manual_seed(seed)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear) and not isinstance(child, FALinear):
            twin: nn.Module = FALinear(child.in_features, child.out_features, child.bias is not None, generator)
        elif isinstance(child, nn.Conv2d) and not isinstance(child, FAConv2d):
            if child.groups != 1 or child.dilation != (1, 1) or isinstance(child.padding, str):
                raise ValueError(f"feedback alignment supports plain Conv2d only, got {child}")
            twin = FAConv2d(child, generator)
        else:
            to_feedback_alignment(child, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            continue
        twin.load_state_dict(child.state_dict(), strict=False)
        setattr(model, name, twin)
    return model
