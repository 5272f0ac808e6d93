"""What the network is trained to do: the loss at the top, the label context an SG is
conditioned on, and the score reported at evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class Task:
    """``classification`` (softmax cross-entropy, one-hot context) or ``regression``
    (MSE 1/2 mean_i ||p_i - y_i||^2, the target vector itself as context)."""

    kind: str
    n_outputs: int
    loss_name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("classification", "regression"):
            raise ValueError(f"task kind {self.kind!r} is unknown")
        if not self.loss_name:
            object.__setattr__(self, "loss_name", "log" if self.kind == "classification" else "mse")

    @property
    def context_dim(self) -> int:
        return self.n_outputs

    def context(self, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "classification" and self.n_outputs > 1:
            # Not F.one_hot: it reads the labels' range back to the host on every call.
            classes = torch.arange(self.n_outputs, device=y.device)
            return (y.long().view(-1, 1) == classes).float()
        if self.kind == "classification":  # binary, one logit: the 0/1 label itself
            return y.float().view(-1, 1)
        return y.float()

    def loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Batch-mean loss. For classification, ``mse`` regresses the one-hot labels."""
        if self.kind == "classification" and self.loss_name == "log":
            if self.n_outputs == 1:
                return F.binary_cross_entropy_with_logits(output.squeeze(1), y.float())
            return F.cross_entropy(output, y.long())
        target = self.context(y)
        return 0.5 * (output - target).pow(2).sum(1).mean()

    def correct(self, output: torch.Tensor, y: torch.Tensor) -> int:
        """Number of correct predictions (classification only)."""
        if self.n_outputs == 1:  # a logit under log loss, a 0/1 regression under MSE
            threshold = 0.0 if self.loss_name == "log" else 0.5
            return int(((output.squeeze(1) > threshold).long() == y.long()).sum())
        return int((output.argmax(1) == y.long()).sum())
