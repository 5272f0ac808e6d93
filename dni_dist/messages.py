"""What stages say to each other. Engines route these; stages never see a socket."""

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
