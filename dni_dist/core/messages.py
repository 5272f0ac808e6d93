"""What stages say to each other, and the fixed shapes of the streams that carry it.

Engines route these; stages never see a socket. ``Stream`` lives here, not with the
transports, because the wire format (``wire/``) and every transport describe the same
streams and neither may import the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class Kind(str, Enum):
    ACTIVATION = "activation"  # up: h_k and the labels, for stage k+1's input
    GRAD = "grad"  # down: gradient w.r.t. the receiver's output h (true or propagated)
    BOOTSTRAP = "bootstrap"  # down: the sender's input gradient under its own SG (a bootstrapped SG target)
    ERROR = "error"  # direct, top -> every lower stage: output error e = dL/dp (DFA, Kickback)


@dataclass
class Message:
    kind: Kind
    step: int
    src: int
    dst: int
    tensor: torch.Tensor
    labels: torch.Tensor | None = None


KIND_CODES = {kind: code for code, kind in enumerate(Kind)}
CODE_KINDS = dict(enumerate(Kind))


@dataclass(frozen=True)
class Stream:
    """One direction between two stages and the shapes and dtypes of what it carries."""

    src: int
    dst: int
    up: bool  # activations (with labels) go up; gradients and errors come down
    shape: tuple[int, ...]
    labels_shape: tuple[int, ...] = ()
    labels_dtype: torch.dtype = torch.long
    # The payload's dtype: the sending stage's precision (float32, or bfloat16 with bf16).
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        return f"{'up' if self.up else 'down'} {self.src}->{self.dst}"


def message_bytes(msg: Message) -> int:
    n = msg.tensor.numel() * msg.tensor.element_size() + 16  # + the (kind, step) header
    if msg.labels is not None:
        n += msg.labels.numel() * msg.labels.element_size()
    return n
