"""What the network is trained to do: the loss at the top, the label context an SG is
conditioned on, and the score reported at evaluation."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

TASK_KINDS: tuple[str, ...] = ("classification", "regression", "language_model")


@functools.cache
def _classes(n: int, device: torch.device) -> torch.Tensor:
    """0 .. n-1 on ``device``, made once: the one-hot context compares labels with it every step."""
    return torch.arange(n, device=device)


@dataclass(frozen=True)
class Task:
    """``classification`` (softmax cross-entropy, one-hot context), ``regression``
    (MSE 1/2 mean_i ||p_i - y_i||^2, the target vector itself as context) or
    ``language_model`` (next-token prediction: logits (B, T, V) for targets (B, T), the loss
    averaged over every position; ``n_outputs`` is the vocabulary size V and ``positions``
    the context length T; the SG context is the integer targets themselves)."""

    kind: str
    n_outputs: int
    loss_name: str = ""
    positions: int = 0

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task kind {self.kind!r} is unknown")
        if (self.kind == "language_model") != (self.positions > 0):
            raise ValueError(f"positions={self.positions}: a language_model task needs positions >= 1, others 0")
        if not self.loss_name:
            object.__setattr__(self, "loss_name", "mse" if self.kind == "regression" else "log")

    @property
    def per_token(self) -> bool:
        """One prediction per position (B, T, V), not one per example."""
        return self.kind == "language_model"

    @property
    def context_dim(self) -> int:
        """Width of the context (for a per-token task: the number of token values it takes)."""
        return self.n_outputs

    @property
    def label_shape(self) -> tuple[int, ...]:
        """Shape of one example's label (what travels up with the activations)."""
        if self.per_token:
            return (self.positions,)
        return () if self.kind == "classification" else (self.n_outputs,)

    @property
    def label_dtype(self) -> torch.dtype:
        return torch.float32 if self.kind == "regression" else torch.long

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one example's output, and of its output error dL/dp."""
        return (self.positions, self.n_outputs) if self.per_token else (self.n_outputs,)

    def blank_labels(self, batch: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """Zero labels of the right shape and type, for planning and cost counting."""
        return torch.zeros(batch, *self.label_shape, dtype=self.label_dtype, device=device)

    def context(self, y: torch.Tensor) -> torch.Tensor:
        if self.per_token:  # integer targets (B, T): the SG looks them up in an embedding
            return y.long()
        if self.kind == "classification" and self.n_outputs > 1:
            # Not F.one_hot: it reads the labels' range back to the host on every call.
            return (y.long().view(-1, 1) == _classes(self.n_outputs, y.device)).float()
        if self.kind == "classification":  # binary, one logit: the 0/1 label itself
            return y.float().view(-1, 1)
        return y.float()

    def loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Batch-mean loss (per-token mean for a language model). For classification and
        language models, ``mse`` regresses the one-hot labels."""
        if self.per_token:
            if self.loss_name == "log":
                return F.cross_entropy(output.reshape(-1, self.n_outputs), y.reshape(-1).long())
            target = F.one_hot(y.long(), self.n_outputs).float()
            return 0.5 * (output - target).pow(2).sum(-1).mean()
        if self.kind == "classification" and self.loss_name == "log":
            if self.n_outputs == 1:
                return F.binary_cross_entropy_with_logits(output.squeeze(1), y.float())
            return F.cross_entropy(output, y.long())
        target = self.context(y)
        return 0.5 * (output - target).pow(2).sum(1).mean()

    def correct(self, output: torch.Tensor, y: torch.Tensor) -> int:
        """Number of correct predictions (classification: examples; language model: tokens)."""
        if self.per_token:
            return int((output.argmax(-1) == y.long()).sum())
        if self.n_outputs == 1:  # a logit under log loss, a 0/1 regression under MSE
            threshold = 0.0 if self.loss_name == "log" else 0.5
            return int(((output.squeeze(1) > threshold).long() == y.long()).sum())
        return int((output.argmax(1) == y.long()).sum())

    def accuracy(self, output: torch.Tensor, y: torch.Tensor) -> float:
        """Fraction of correct predictions: per example, or per token for a language model."""
        return self.correct(output, y) / (y.numel() if self.per_token else len(y))

    def perplexity(self, output: torch.Tensor, y: torch.Tensor) -> float:
        """exp(mean next-token cross-entropy): the test loss under log loss, whatever loss
        the model was trained with (language models only)."""
        ce = F.cross_entropy(output.reshape(-1, self.n_outputs), y.reshape(-1).long())
        return math.exp(min(float(ce), 700.0))  # beyond that exp overflows; the model is useless anyway
