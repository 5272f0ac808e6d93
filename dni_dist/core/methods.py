"""Boundary methods: what the part below a cut is trained with (the paper's Table 1).

Every method is written in the paper's unified form, as an SG module at the cut: the
lower part receives either the SG's output (``sg``) or dL_SG/dh, the SG loss
L_SG = 1/2 ||SG(h) - target||^2 differentiated w.r.t. h with the target held constant.
With target = SG(h) - s this gives dL_SG/dh = s dSG/dh, so

- backprop: SG(h) = h (fixed), s = dL/dh          -> dL/dh
- fa:       same boundary as backprop; the layers *above* use random feedback
            (see feedback.py), so s is FA's error, not dL/dh
- dfa:      SG(h) = h R (R fixed random, to output size), s = e = dL/dp -> e R^T
- kickback: SG(h) = h 1 (ones), s = e              -> e 1^T
- sg:       SG(h, y) learned; the lower part gets SG(h, y) without waiting
- sg-prop:  SG(h, y) + alpha dL_SG/dh with the target dL/dh: waits for it
- ddg:      backprop's boundary, but the lower part does not wait: it keeps taking inputs
            and applies each step's true gradient when it arrives, through the weights
            that step's forward used (Decoupled Parallel Backpropagation, delayed gradients)
- fdg:      ddg with FDG's gradient shrinking: the delayed gradient times ``shrink`` < 1
            (a real step-size change under SGD, FDG's optimiser; Adam divides it away)

Gradients exchanged between stages are gradients of the batch-mean loss (what autograd
gives); learned SGs work in per-example units (see synthetic.py), hence the batch factors.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import nn

from dni_dist.core.synthetic import SyntheticGradient
from dni_dist.errors import ConfigError

METHODS: tuple[str, ...] = ("backprop", "sg", "sg-prop", "fa", "dfa", "kickback", "ddg", "fdg")
Waits = Literal["nothing", "grad", "error"]


def _half_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a - b).pow(2).sum()


class Boundary(nn.Module):
    """One cut, owned by the stage below it.

    ``waits_for`` is what must arrive from above before the lower part can update:
    nothing (unlocked), ``grad`` (the gradient w.r.t. h from the stage above) or ``error``
    (the output error e = dL/dp, sent directly by the top stage).
    """

    name: ClassVar[str]
    waits_for: ClassVar[Waits]
    learned: ClassVar[bool] = False
    update_locked: ClassVar[bool] = True
    backwards_locked: ClassVar[bool] = True
    direct_error: ClassVar[bool] = False
    # A locked method whose stage still takes the next input before its signal arrives
    # (delayed gradients): its update waits, its pipeline does not.
    runs_ahead: ClassVar[bool] = False

    def signal(self, h: torch.Tensor, context: torch.Tensor, received: torch.Tensor | None) -> torch.Tensor:
        """g_hat for the lower part, in batch-mean-loss units, shaped like h."""
        raise NotImplementedError


class _FixedSGBoundary(Boundary):
    """A fixed (untrained) SG whose dL_SG/dh is handed to the lower part."""

    def fixed_sg(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def signal(self, h: torch.Tensor, context: torch.Tensor, received: torch.Tensor | None) -> torch.Tensor:
        if received is None:
            raise ValueError(f"{self.name} needs the {self.waits_for} from above before it can update")
        # In float32 whatever the stage's precision: for backprop the target is h - dL/dh,
        # and in bf16 a small dL/dh is lost against |h| in that difference.
        device_type = "cuda" if h.is_cuda else "cpu"  # autocast knows no "meta" (cost counting)
        with torch.enable_grad(), torch.autocast(device_type, enabled=False):
            h32 = h.detach().float().requires_grad_(True)
            out = self.fixed_sg(h32)
            target = (out - received.float()).detach()  # the table's target, e.g. h - dL/dh for backprop
            (g,) = torch.autograd.grad(_half_sq(out, target), h32)
        return g.to(h.dtype)


class BackpropBoundary(_FixedSGBoundary):
    name = "backprop"
    waits_for = "grad"

    def fixed_sg(self, h: torch.Tensor) -> torch.Tensor:
        return h


class FeedbackAlignmentBoundary(BackpropBoundary):
    """The cut itself passes the error on unchanged; FA lives in the layers above it."""

    name = "fa"


class DelayedGradientBoundary(BackpropBoundary):
    """Delayed gradients (DDG): the true dL/dh, applied whenever it arrives.

    In the table it is backprop (each update waits for its step's gradient), but the stage
    does not wait before its next input: it runs ahead on its current weights and keeps
    each step's weights (weight stashing), so the delayed gradient is exactly backprop's
    for that step. In lockstep it is backprop.
    """

    name = "ddg"
    runs_ahead = True


class ShrunkDelayedGradientBoundary(DelayedGradientBoundary):
    """FDG's gradient shrinking: the delayed gradient times ``shrink`` in (0, 1]."""

    name = "fdg"

    def __init__(self, shrink: float) -> None:
        super().__init__()
        if not 0.0 < shrink <= 1.0:
            raise ValueError(f"shrink={shrink} must be in (0, 1]")
        self.shrink = shrink

    def signal(self, h: torch.Tensor, context: torch.Tensor, received: torch.Tensor | None) -> torch.Tensor:
        return super().signal(h, context, received) * self.shrink


class DirectFeedbackBoundary(_FixedSGBoundary):
    name = "dfa"
    waits_for = "error"
    backwards_locked = False
    direct_error = True

    def __init__(self, feature_shape: tuple[int, ...], n_outputs: int, seed: int, positions: int = 0) -> None:
        super().__init__()
        # Token-level tasks (positions > 0): the error e_t at each position is projected onto
        # that position's activation h_t with one matrix (W x V) shared by all positions.
        if positions and (len(feature_shape) != 2 or feature_shape[0] != positions):
            raise ConfigError(
                f"{self.name} on a token-level task needs activations (T={positions}, W) at its cut, "
                f"got shape {tuple(feature_shape)}"
            )
        self.per_token = positions > 0
        rows = feature_shape[-1] if self.per_token else math.prod(feature_shape)
        generator = torch.Generator().manual_seed(seed)
        projection = torch.randn(rows, n_outputs, generator=generator) * n_outputs**-0.5
        self.register_buffer("projection", projection)

    def fixed_sg(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.projection if self.per_token else h.flatten(1) @ self.projection


class KickbackBoundary(DirectFeedbackBoundary):
    """DFA with R = 1: every unit receives the sum of the output errors."""

    name = "kickback"

    def __init__(self, feature_shape: tuple[int, ...], n_outputs: int, seed: int, positions: int = 0) -> None:
        super().__init__(feature_shape, n_outputs, seed, positions)
        self.projection.fill_(1.0)


class SyntheticBoundary(Boundary):
    """A learned SG: the lower part updates from SG(h, y) at once (update unlocked)."""

    name = "sg"
    waits_for = "nothing"
    learned = True
    update_locked = False
    backwards_locked = False

    def __init__(self, sg: SyntheticGradient) -> None:
        super().__init__()
        self.sg = sg

    def signal(self, h: torch.Tensor, context: torch.Tensor, received: torch.Tensor | None) -> torch.Tensor:
        return self.predict(h, context) / h.shape[0]

    @torch.no_grad()
    def predict(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The SG's output in per-example units (what its targets are compared with)."""
        return self.sg(h.detach(), context)

    @property
    def reuses_outputs(self) -> bool:
        """Can an output made for an update train the SG after its later steps
        (``sg.reuse_lag``)? Only an unlocked SG, and one whose kept outputs still train it."""
        return not self.update_locked and self.sg.fits_kept_outputs

    def tracked_signal(self, h: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the SG's output with its graph to the SG's parameters, ``signal``'s value): the
        output can train the SG later (``fit_loss``) if the SG has not changed meanwhile."""
        with torch.enable_grad():
            out = self.sg(h.detach(), context)
        return out, out.detach() / h.shape[0]

    def sg_loss(
        self, h: torch.Tensor, context: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_SG, SG output): 1/2 ||SG(h, y) - B dL/dh||^2 averaged over the batch, the loss
        in float32 whatever the precision of the SG's forward pass."""
        return self.fit_loss(self.sg(h.detach(), context), target)

    @staticmethod
    def fit_loss(out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``sg_loss`` given the SG's output ``out`` (with its graph) for the step."""
        batch = out.shape[0]
        return _half_sq(out.float(), target.detach().float() * batch) / batch, out.detach()


class SyntheticPropBoundary(SyntheticBoundary):
    """SG + prop: g_hat = SG(h, y) + alpha dL_SG/dh, so it must wait for the target."""

    name = "sg-prop"
    waits_for = "grad"
    update_locked = True
    backwards_locked = True

    def __init__(self, sg: SyntheticGradient, alpha: float) -> None:
        super().__init__(sg)
        self.alpha = alpha

    def signal(self, h: torch.Tensor, context: torch.Tensor, received: torch.Tensor | None) -> torch.Tensor:
        if received is None:
            raise ValueError("sg-prop needs the gradient from above before it can update")
        batch = h.shape[0]
        with torch.enable_grad():
            h = h.detach().requires_grad_(True)
            out = self.sg(h, context)
            (prop,) = torch.autograd.grad(_half_sq(out, received.detach() * batch), h)
        return (out.detach() + self.alpha * prop) / batch


def build_boundary(
    method: str,
    sg: SyntheticGradient | None,
    feature_shape: tuple[int, ...],
    n_outputs: int,
    seed: int,
    sg_prop_alpha: float = 1.0,
    fdg_shrink: float = 0.5,
    positions: int = 0,
) -> Boundary:
    """The boundary object for ``method`` at one cut; ``sg`` is required for learned methods.
    ``positions`` > 0: a token-level task (DFA and Kickback project each position's error)."""
    if method in ("backprop", "fa"):
        return BackpropBoundary() if method == "backprop" else FeedbackAlignmentBoundary()
    if method == "ddg":
        return DelayedGradientBoundary()
    if method == "fdg":
        return ShrunkDelayedGradientBoundary(fdg_shrink)
    if method == "dfa":
        return DirectFeedbackBoundary(feature_shape, n_outputs, seed, positions)
    if method == "kickback":
        return KickbackBoundary(feature_shape, n_outputs, seed, positions)
    if method in ("sg", "sg-prop"):
        if sg is None:
            raise ValueError(f"method {method!r} needs an SG module")
        return SyntheticBoundary(sg) if method == "sg" else SyntheticPropBoundary(sg, sg_prop_alpha)
    raise ConfigError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}")
