"""One segment's step, as an event-driven state machine with no I/O.

A stage reacts to two events and answers with the messages to send:

- ``forward(step, x, y)``: the input for a step arrived (data for stage 0, an activation
  otherwise). Returns the activation for the stage above (or, at the top, the gradient or
  output error for the stages below: the top computes the loss and updates at once).
- ``update(step)``: the unlocked update, called right after the activation was sent: an
  ``sg`` boundary trains the segment from its SG at once. Locked methods do nothing here.
- ``on_message(msg)``: a gradient, bootstrap target or output error arrived for an old step.
  Locked methods update now; an ``sg`` boundary trains its SG on the target.

The local engine calls these in lockstep; the distributed engine calls them as messages
arrive. Keeping every numeric decision here is what makes the two engines agree.

SG targets (``target_mode``): ``bootstrap`` trains SG_k on what stage k+1 computed from its
own SG (free, available at once); ``true`` on the true, delayed dL/dh, which stage k+1
passes on down through the weights it used in the forward pass (weight stashing, so the
gradient is exactly backprop's for that step even though stage k+1 has updated since);
``lambda`` on lambda * true + (1 - lambda) * bootstrap (the DNI paper's BP(lambda) mix).

No host read-backs: nothing here reads a device tensor back to the host, so on a GPU the
CPU queues step after step without waiting. Non-finite steps are skipped on the device
(core/numerics.py); losses, SG losses, cosines and counters of device events stay device
tensors, read when an engine polls (``take_losses``, ``check_numerics``, ``stats.summary``).
Wall-clock compute times are therefore the CPU's time to issue the work on a GPU.

Weight stash: with ``stash_versions`` N > 0 at most N pending steps keep a copy of the
weights; a step without one keeps no graph, and its true gradient is passed down through
a forward recomputed from its stored input under the current weights (as a stage without
weight stashing would). 0 stashes every pending step (exact; bounded by the in-flight limit).
"""

from __future__ import annotations

import itertools
import random
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from dni_dist.core.histogram import STALENESS_BOUNDS, STEP_SECONDS_BOUNDS, Histogram
from dni_dist.core.messages import Kind, Message
from dni_dist.core.methods import Boundary, SyntheticBoundary
from dni_dist.core.numerics import NonFiniteLog, NumericFault, all_finite, masked_step, read_number
from dni_dist.core.precision import autocast, wire_dtype
from dni_dist.core.staleness import StalenessControl, StalenessPolicy, agreement
from dni_dist.core.tasks import Task

TARGET_MODES: tuple[str, ...] = ("bootstrap", "true", "lambda")
__all__ = ["TARGET_MODES", "NumericFault", "Stage", "StageStats"]


@dataclass
class _Pending:
    """What a stage keeps of a step until the targets it waits for have arrived."""

    x: torch.Tensor
    h: torch.Tensor
    context: torch.Tensor
    params: list[torch.Tensor]  # the tensors h's graph was built from (module params or a stash)
    forward_at: int
    ok: torch.Tensor  # 0-dim bool on the device: all finite so far (else no update from this step)
    bootstrap: torch.Tensor | None = None
    stashed: bool = False  # params are this step's own copy of the weights
    seconds: float = 0.0  # compute spent on this step so far (forward, update, targets)
    # The SG's output behind this step's update, with its graph, and the SG's version then:
    # the SG's training reuses it if the SG has not learned since (see Stage._train_sg).
    prediction: torch.Tensor | None = None
    sg_version: int = -1


@dataclass
class StageStats:
    """Running counters of one stage; ``summary()`` is what summary.json reports.

    Counters of what happened on the device (SG loss and cosine sums, clipped signals,
    masked updates) become device tensors at their first event; ``summary()`` and the
    probe read them back. ``updates`` and the kinds of update count the optimiser steps
    issued; ``masked_updates`` those of them the device skipped (non-finite)."""

    steps: int = 0
    # What each update of the segment waited for (the unified table's locking, measured):
    # nothing (unlocked), the gradient from the stage above, or the output error from the top.
    updates_without_waiting: int = 0
    updates_after_grad: int = 0
    updates_after_error: int = 0
    updates: int = 0
    skipped_updates: int = 0
    masked_updates: int | torch.Tensor = 0
    dropped_targets: int = 0
    evicted_steps: int = 0
    sg_updates: int = 0
    sg_masked: int | torch.Tensor = 0
    sg_loss_sum: float | torch.Tensor = 0.0
    sg_cosine_sum: float | torch.Tensor = 0.0
    staleness_sum: int = 0
    # Steps with a NaN/Inf in an activation, loss, SG output or received gradient: their
    # updates were skipped (counted when the stage's flags are checked). Clipped: SG outputs
    # scaled down to sg.clip.
    nonfinite_steps: int = 0
    clipped_signals: int | torch.Tensor = 0
    compute_seconds: float = 0.0
    # Top stage: losses of the steps since an engine last took them (take_losses), so a
    # long run does not keep one float per step forever.
    losses: list[torch.Tensor] = field(default_factory=list)
    # Distributions for the metrics endpoint (not in summary()): compute seconds per
    # completed step, and SG target staleness in steps.
    step_seconds: Histogram = field(default_factory=lambda: Histogram(STEP_SECONDS_BOUNDS))
    staleness: Histogram = field(default_factory=lambda: Histogram(STALENESS_BOUNDS))

    def summary(self) -> dict[str, float | int | None]:
        n = self.sg_updates - read_number(self.sg_masked)
        return {
            "steps": self.steps,
            "updates": self.updates - read_number(self.masked_updates),
            "updates_without_waiting": self.updates_without_waiting,
            "updates_after_grad": self.updates_after_grad,
            "updates_after_error": self.updates_after_error,
            "skipped_updates": self.skipped_updates,
            "dropped_targets": self.dropped_targets,
            "evicted_steps": self.evicted_steps,
            "sg_updates": n,
            "sg_loss": read_number(self.sg_loss_sum) / n if n else None,
            "sg_cosine": read_number(self.sg_cosine_sum) / n if n else None,
            "mean_staleness": self.staleness_sum / self.sg_updates if self.sg_updates else None,
            "nonfinite_steps": self.nonfinite_steps,
            "clipped_signals": read_number(self.clipped_signals),
            "compute_seconds": self.compute_seconds,
        }


class Stage:
    """Segment ``index`` of ``num_stages``; ``boundary`` is None only at the top."""

    def __init__(
        self,
        index: int,
        num_stages: int,
        module: nn.Module,
        boundary: Boundary | None,
        task: Task,
        optimizer: torch.optim.Optimizer | None,
        sg_optimizer: torch.optim.Optimizer | None = None,
        target_mode: str = "true",
        target_lambda: float = 0.5,
        update_prob: float = 1.0,
        window: int = 64,
        seed: int = 0,
        direct_error: bool = False,
        nan_limit: int = 3,
        sg_clip: float = 0.0,
        micro_batches: int = 1,
        staleness: StalenessPolicy | None = None,
        precision: str = "fp32",
        stash_versions: int = 0,
    ) -> None:
        if target_mode not in TARGET_MODES:
            raise ValueError(f"target mode {target_mode!r} is unknown; use one of {', '.join(TARGET_MODES)}")
        if micro_batches < 1:
            raise ValueError(f"micro_batches={micro_batches} must be >= 1")
        if stash_versions < 0:
            raise ValueError(f"stash_versions={stash_versions} must be >= 0")
        self.index = index
        self.num_stages = num_stages
        self.is_top = index == num_stages - 1
        if self.is_top != (boundary is None):
            raise ValueError("exactly the top stage has no boundary")
        self.module = module
        self.boundary = boundary
        self.task = task
        self.optimizer = optimizer
        self.sg_optimizer = sg_optimizer
        self.target_mode = target_mode
        self.target_lambda = target_lambda
        self.update_prob = update_prob
        self.window = window
        # At the top: send the output error straight to every lower stage (DFA, Kickback).
        self.direct_error = direct_error
        self.nan_limit = nan_limit
        self.sg_clip = sg_clip
        self._numerics = NonFiniteLog(index, nan_limit)
        self.precision = precision
        self.wire_dtype = wire_dtype(precision)  # what this stage sends: activations, gradients
        self.stash_versions = stash_versions
        # Pipelined backprop (GPipe): steps s with the same s // micro_batches form one
        # mini-batch; their gradients are averaged and the optimiser steps once, after the
        # last of them, so the update is backprop's on the concatenated batch.
        self.micro_batches = micro_batches
        self.stats = StageStats()
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        # A host generator: whether to update is a host decision, never a device read-back.
        self._update_rng = random.Random(seed * 1009 + index)
        self._group_ok: torch.Tensor | None = None  # a GPipe group's steps all finite so far
        self._clock = 0
        learned = isinstance(boundary, SyntheticBoundary) and not boundary.update_locked
        # Weight stashing is needed wherever the segment updates before a step's true gradient
        # goes through it: an unlocked SG stage that has a stage below and true targets, and
        # every delayed-gradient (ddg/fdg) stage, whose own update comes after later forwards.
        delayed = boundary is not None and boundary.runs_ahead
        self._stash = (learned and index > 0 and target_mode != "bootstrap") or delayed
        # Late targets (core/staleness.py): only an unlocked SG updates before they arrive.
        policy = staleness or StalenessPolicy()
        self._late = StalenessControl(policy, optimizer) if learned else None
        # An unlocked SG's output for a step's update is what its training on that step's
        # target computes again, as long as the SG has not learned in between: always in
        # lockstep; in a pipeline only when targets come back within a step (at K=2 on the
        # 2-core machine they come a step later, RESULTS.md). Kept for SGs without buffers:
        # a batch-norm SG's second forward also moves its running statistics, which reuse
        # would change. ``_sg_version`` counts the SG's optimiser steps.
        self.keeps_sg_prediction = learned and not list(boundary.sg.buffers())
        self._sg_version = 0
        # sg.reuse_lag L > 0: the output also trains the SG after up to L SG steps (a gradient
        # that old; at K=2 a pipeline's targets come one SG step late). Targets come in step
        # order, so a step with more than L older steps waiting at its update cannot reuse:
        # only the oldest L + 1 waiting steps keep their outputs. The pending-memory meter,
        # which budgets what each waiting step holds, counts an output per step when L > 0.
        self.reuse_lag = policy.reuse_lag if learned and boundary.reuses_outputs else 0

    # ----------------------------------------------------------------- events
    def forward(self, step: int, x: torch.Tensor, labels: torch.Tensor) -> list[Message]:
        started = time.perf_counter()
        self.module.train()
        self.stats.steps += 1
        self._clock += 1
        context = self.task.context(labels)
        needs_input_grad = self.index > 0
        x = x.detach().requires_grad_(needs_input_grad)
        stashed = self._stash and (
            not self.stash_versions or sum(p.stashed for p in self._pending.values()) < self.stash_versions
        )
        with autocast(self.precision, x.device):
            if stashed:
                params = [p.detach().clone().requires_grad_(True) for p in self.module.parameters()]
                names = [n for n, _ in self.module.named_parameters()]
                h = torch.func.functional_call(self.module, dict(zip(names, params, strict=True)), (x,))
            else:
                params = list(self.module.parameters())
                h = self.module(x)
        if self.is_top:
            out = self._top_step(step, x, h, labels, params)
        else:
            # Only h: a non-finite input (checked by the stage below as its h) makes h non-finite.
            ok = all_finite(h)
            self._numerics.record(step, "activations", ok)
            sent = h.detach().to(self.wire_dtype)
            if self._stash and not stashed and self.boundary.waits_for != "nothing":
                h = h.detach()  # no stash: the graph would see later updates; recomputed instead
            pending = self._pending[step] = _Pending(x, h, context, params, self._clock, ok, stashed=stashed)
            self._evict_stale()
            out = [Message(Kind.ACTIVATION, step, self.index, self.index + 1, sent, labels)]
        elapsed = time.perf_counter() - started
        self.stats.compute_seconds += elapsed
        if self.is_top:  # the top's step is complete here: forward, backward and update
            self.stats.step_seconds.observe(elapsed)
        else:
            pending.seconds = elapsed
        return out

    def update(self, step: int) -> list[Message]:
        """The unlocked update from the local SG (no-op for locked methods and the top)."""
        if self.is_top or self.boundary.waits_for != "nothing" or step not in self._pending:
            return []
        started = time.perf_counter()
        pending = self._pending[step]
        with autocast(self.precision, pending.x.device):
            if self.keeps_sg_prediction and step in itertools.islice(self._pending, self.reuse_lag + 1):
                pending.prediction, signal = self.boundary.tracked_signal(pending.h, pending.context)
                pending.sg_version = self._sg_version
            else:
                signal = self.boundary.signal(pending.h, pending.context, None)
            signal = self._clip(signal)
        want_bootstrap = self.index > 0 and self.target_mode != "true"
        ok = pending.ok & all_finite(signal)
        self._numerics.record(step, "SG outputs", ok)
        gate = self._late.gate() if self._late is not None else None
        input_grad = self._apply(
            step, pending, signal, want_input_grad=want_bootstrap, keep_graph=pending.stashed, scale=gate, ok=ok
        )
        self.stats.updates_without_waiting += 1
        out = []
        if input_grad is not None:  # a skipped step sends a target the stage below skips too
            out.append(Message(Kind.BOOTSTRAP, step, self.index, self.index - 1, self._outgoing(input_grad, ok)))
        elapsed = time.perf_counter() - started
        self.stats.compute_seconds += elapsed
        pending.seconds += elapsed
        return out

    def on_message(self, msg: Message) -> list[Message]:
        """A gradient, bootstrap target or output error for step ``msg.step`` arrived."""
        if self.is_top:
            raise ValueError(f"the top stage received a {msg.kind.value} message")
        pending = self._pending.get(msg.step)
        if pending is None:  # evicted by the staleness window, or a duplicate
            self.stats.dropped_targets += 1
            return []
        started = time.perf_counter()
        ok = all_finite(msg.tensor)
        self._numerics.record(msg.step, f"{msg.kind.value} values", ok)
        pending.ok = pending.ok & ok
        if self.boundary.waits_for == "nothing":
            out = self._on_sg_target(msg, pending)
        else:
            out = self._on_locked_signal(msg, pending)
        elapsed = time.perf_counter() - started
        self.stats.compute_seconds += elapsed
        pending.seconds += elapsed
        if msg.step not in self._pending:  # the step is done: all its compute is counted
            self.stats.step_seconds.observe(pending.seconds)
        return out

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The segment's output in evaluation mode, in the stage's precision (the top's as
        float32, for the loss)."""
        self.module.eval()
        with autocast(self.precision, x.device):
            out = self.module(x)
        return out.float() if self.is_top else out.to(self.wire_dtype)

    def take_losses(self) -> list[float]:
        """The top stage's per-step losses since the last call, oldest first (one read-back)."""
        losses = self.take_loss_tensors()
        return torch.stack(losses).tolist() if losses else []

    def take_loss_tensors(self) -> list[torch.Tensor]:
        """The same as 0-dim device tensors, without reading them back."""
        losses, self.stats.losses = self.stats.losses, []
        return losses

    def check_numerics(self) -> None:
        """Read back the non-finite flags recorded since the last check (one read-back),
        count the bad steps, and raise NumericFault if ``nan_limit`` came in a row.
        Engines call it when they poll (end of a chunk or epoch), never per step."""
        try:
            self._numerics.check()
        finally:
            self.stats.nonfinite_steps = self._numerics.count

    @property
    def pending_steps(self) -> int:
        return len(self._pending)

    def pending_tensors(self, step: int) -> list[torch.Tensor]:
        """What pending ``step`` keeps besides its graph: input, activation, context, and the
        stashed weights (for core.pending's memory measurement). Empty if it is not pending."""
        pending = self._pending.get(step)
        if pending is None:
            return []
        return [pending.x, pending.h, pending.context, *(pending.params if pending.stashed else [])]

    @property
    def stashes_weights(self) -> bool:
        """Do this stage's waiting steps keep a copy of the weights (up to ``stash_versions``)?"""
        return self._stash

    @property
    def keeps_graph(self) -> bool:
        """Does a pending step keep its forward graph (saved tensors) until a target arrives?
        Locked methods backprop the signal through it; stashing stages pass the true gradient."""
        return not self.is_top and (self._stash or self.boundary.waits_for != "nothing")

    @property
    def down_source(self) -> int | None:
        """The stage whose messages this one waits for: the top for a direct error."""
        if self.is_top:
            return None
        return self.num_stages - 1 if self.boundary.waits_for == "error" else self.index + 1

    @property
    def down_messages_per_step(self) -> int:
        """How many messages arrive from ``down_source`` for each step (the wire protocol)."""
        if self.is_top:
            return 0
        above_is_top = self.index + 1 == self.num_stages - 1
        if self.boundary.waits_for == "nothing" and self.target_mode == "lambda" and not above_is_top:
            return 2  # the bootstrap target at once, the true gradient later
        return 1

    @property
    def locked(self) -> bool:
        """Must this stage wait for a signal from above before taking its next input?"""
        return not self.is_top and self.boundary.update_locked and not self.boundary.runs_ahead

    def takes_input(self, step: int) -> bool:
        """May a locked stage start ``step`` now? Yes if nothing is pending, or if the pending
        steps are micro-batches of the same group: no update comes between them."""
        if not self.locked or not self._pending:
            return True
        oldest = next(iter(self._pending))
        return oldest // self.micro_batches == step // self.micro_batches

    # -------------------------------------------------------------- internals
    def _top_step(
        self, step: int, x: torch.Tensor, output: torch.Tensor, labels: torch.Tensor, params: list[torch.Tensor]
    ) -> list[Message]:
        loss = self.task.loss(output.float(), labels)  # in float32 whatever the precision
        self.stats.losses.append(loss.detach())
        # A non-finite input or output makes the loss non-finite; the gradients sent down are
        # not finite either, so the stages below skip that step too.
        ok = all_finite(loss)
        self._numerics.record(step, "losses", ok)
        direct = self.direct_error
        extra = [output] if direct else []
        extra += [x] if (self.index > 0 and not direct) else []
        grads = torch.autograd.grad(loss, params + extra, allow_unused=True)
        self._step_optimizer(grads[: len(params)], step, ok)
        if self.index == 0:
            return []
        if direct:
            error = grads[len(params)].to(self.wire_dtype)
            return [Message(Kind.ERROR, step, self.index, k, error) for k in range(self.index)]
        return [Message(Kind.GRAD, step, self.index, self.index - 1, grads[-1].to(self.wire_dtype))]

    def _on_sg_target(self, msg: Message, pending: _Pending) -> list[Message]:
        if msg.kind is Kind.BOOTSTRAP and self.target_mode == "lambda":
            pending.bootstrap = msg.tensor
            return []
        if msg.kind is Kind.GRAD and self.target_mode == "lambda" and pending.bootstrap is not None:
            target = self.target_lambda * msg.tensor + (1 - self.target_lambda) * pending.bootstrap
        else:
            # A GRAD from the top stage is the true gradient, which is also what the top
            # would bootstrap to, so it serves every mode.
            target = msg.tensor
        # pending.ok holds the checks of every tensor received for the step (on_message), so
        # of everything the target is made of.
        self._train_sg(pending, target, pending.ok)
        out = []
        if self.target_mode != "bootstrap" and self.index > 0:
            if not pending.stashed:  # over the stash budget: through the current weights
                self._forward_again(pending)
            (down,) = torch.autograd.grad(pending.h, pending.x, msg.tensor.to(pending.h.dtype))
            out.append(Message(Kind.GRAD, msg.step, self.index, self.index - 1, down.to(self.wire_dtype)))
        del self._pending[msg.step]
        return out

    def _on_locked_signal(self, msg: Message, pending: _Pending) -> list[Message]:
        boundary = self.boundary
        expected = Kind.ERROR if boundary.waits_for == "error" else Kind.GRAD
        if msg.kind is not expected:
            raise ValueError(f"stage {self.index} ({boundary.name}) got a {msg.kind.value}, expected {expected.value}")
        send_down = self.index > 0 and boundary.waits_for == "grad"
        del self._pending[msg.step]
        ok = pending.ok  # else no update; what goes down is not finite, so the stage below skips too
        if self._stash and not pending.stashed:  # ddg over the stash budget: the current weights
            self._forward_again(pending)
        with autocast(self.precision, pending.x.device):
            signal = boundary.signal(pending.h, pending.context, msg.tensor)
        if boundary.learned:  # sg-prop: the SG learns from the same target it was just given
            self._train_sg(pending, msg.tensor, ok)
        input_grad = self._apply(msg.step, pending, signal, want_input_grad=send_down, keep_graph=False, ok=ok)
        if msg.kind is Kind.ERROR:
            self.stats.updates_after_error += 1
        else:
            self.stats.updates_after_grad += 1
        if input_grad is None:
            return []
        return [Message(Kind.GRAD, msg.step, self.index, self.index - 1, self._outgoing(input_grad, ok))]

    def _apply(
        self,
        step: int,
        pending: _Pending,
        signal: torch.Tensor,
        want_input_grad: bool,
        keep_graph: bool,
        scale: torch.Tensor | None = None,
        ok: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Backprop ``signal`` through the segment; step the optimiser (on the parameter
        gradients times ``scale``, if given; skipped on the device unless ``ok``); maybe
        return dL/dx (never scaled)."""
        inputs = pending.params + ([pending.x] if want_input_grad else [])
        signal = signal.to(pending.h.dtype)
        grads = torch.autograd.grad(pending.h, inputs, signal, retain_graph=keep_graph, allow_unused=True)
        param_grads = grads[: len(pending.params)]
        if scale is not None:
            param_grads = tuple(None if g is None else g * scale for g in param_grads)
        self._step_optimizer(param_grads, step, pending.ok if ok is None else ok)
        return grads[-1] if want_input_grad else None

    def _step_optimizer(self, grads: tuple[torch.Tensor | None, ...], step: int, ok: torch.Tensor) -> None:
        if self.optimizer is None:
            return
        m = self.micro_batches
        if m > 1:  # accumulate the group's mean gradient; step after its last micro-batch
            for p, g in zip(self.module.parameters(), grads, strict=True):
                if g is not None:
                    p.grad = g / m if p.grad is None else p.grad.add_(g, alpha=1 / m)
            self._group_ok = ok if self._group_ok is None else self._group_ok & ok
            if (step + 1) % m:
                return
            ok, self._group_ok = self._group_ok, None  # one bad micro-batch skips its group
        # Stochastic updates (DNI paper): each stage updates with probability p per step
        # (per mini-batch with micro-batches). The draw happens every time so the sequence
        # does not depend on p's history.
        if self._update_rng.random() >= self.update_prob:
            self.stats.skipped_updates += 1
            self.optimizer.zero_grad(set_to_none=True)  # drop what a group accumulated
            return
        if m == 1:
            for p, g in zip(self.module.parameters(), grads, strict=True):
                p.grad = g
        masked_step(self.optimizer, ok)  # consumes the gradients
        self.stats.updates += 1
        self.stats.masked_updates += (~ok).long()

    def _train_sg(self, pending: _Pending, target: torch.Tensor, ok: torch.Tensor) -> None:
        """Train the SG on ``target`` for the pending step; skipped on the device unless ``ok``."""
        boundary = self.boundary
        assert isinstance(boundary, SyntheticBoundary) and self.sg_optimizer is not None
        staleness = self._clock - pending.forward_at
        refresh = self._late is not None and self._late.refresh()
        # The SG's output made for this step's update is the fitting pass's output if the SG
        # has not learned since (same weights, same h), and with sg.reuse_lag it trains the SG
        # after that many SG steps too: one SG forward a step instead of two. A skipped step's
        # NaNs go into the masked loss, which the masked step ignores.
        made, pending.prediction = pending.prediction, None
        usable = made is not None and self._sg_version - pending.sg_version <= self.reuse_lag
        with autocast(self.precision, pending.x.device):
            h = self._recompute(pending.x) if refresh else pending.h
            # How good the SG was for this step: its output on the step's own h, before it
            # learns from the target (the fitting pass gives just that, unless h is refreshed;
            # then the kept output, when usable, or one more SG forward).
            prediction = None
            if refresh:
                prediction = made.detach() if usable else boundary.predict(pending.h, pending.context)
            with torch.enable_grad():
                if usable and not refresh:
                    loss, fitted = boundary.fit_loss(made, target)
                else:
                    # A skipped step's h may hold NaNs: zeros keep them out of the SG's batch norm.
                    h = torch.where(ok, h.detach(), 0)
                    loss, fitted = boundary.sg_loss(h, pending.context, target)
        loss.backward()  # into gradients that are None: the last masked_step consumed them
        masked_step(self.sg_optimizer, ok)
        self._sg_version += 1
        prediction = (fitted if prediction is None else prediction).float()
        scaled = target.float().flatten() * target.shape[0]
        cosine, error = agreement(prediction, scaled)
        if self._late is not None:
            self._late.observe(error, staleness, ok)
        self.stats.sg_updates += 1
        self.stats.sg_masked += (~ok).long()
        # float64 sums: a long run adds millions of terms
        self.stats.sg_loss_sum += torch.where(ok, loss.detach(), 0).double()
        self.stats.sg_cosine_sum += torch.where(ok, cosine, 0).double()
        self.stats.staleness_sum += staleness
        self.stats.staleness.observe(staleness)

    @torch.no_grad()
    def _recompute(self, x: torch.Tensor) -> torch.Tensor:
        """The segment's activation for a stored input under its current weights, in
        training mode, leaving batch-norm statistics as they were (the step already
        counted them)."""
        self.module.train()
        buffers = {name: b.clone() for name, b in self.module.named_buffers()}
        if not buffers:
            return self.module(x.detach())
        return torch.func.functional_call(self.module, buffers, (x.detach(),))

    def _forward_again(self, pending: _Pending) -> None:
        """Rebuild a step's graph from its stored input under the current weights (a step
        that has no weight stash), batch-norm statistics left as they were."""
        x = pending.x.detach().requires_grad_(self.index > 0)
        buffers = {name: b.clone() for name, b in self.module.named_buffers()}
        with torch.enable_grad(), autocast(self.precision, x.device):
            self.module.train()
            pending.h = torch.func.functional_call(self.module, buffers, (x,)) if buffers else self.module(x)
        pending.x = x
        pending.params = list(self.module.parameters())

    def _clip(self, signal: torch.Tensor) -> torch.Tensor:
        """Scale each example's SG output down to norm ``sg_clip`` (in per-example units)."""
        if not self.sg_clip:
            return signal
        per_example = signal.float().flatten(1).norm(dim=1) * signal.shape[0]
        factor = (self.sg_clip / per_example.clamp_min(1e-12)).clamp(max=1.0)
        self.stats.clipped_signals += (factor < 1).sum()
        return (signal * factor.view(-1, *([1] * (signal.dim() - 1)))).to(signal.dtype)

    def _outgoing(self, grad: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """A gradient to send down: NaN where the step was skipped (the receiver skips it
        too), in the wire's dtype."""
        return torch.where(ok, grad, float("nan")).to(self.wire_dtype)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a restarted stage needs to continue exactly (between steps only)."""
        if self._pending:
            raise RuntimeError(f"stage {self.index}: cannot checkpoint with {len(self._pending)} steps in flight")
        self.check_numerics()  # the flags since the last poll belong to this state
        # Plain containers only (histograms as dicts), so checkpoints load with weights_only.
        # Device counters as numbers: a checkpoint is read back on another device, or none.
        stats = {
            k: asdict(v) if isinstance(v, Histogram) else read_number(v)
            for k, v in vars(self.stats).items()
            if k != "losses"
        }
        return {
            "module": self.module.state_dict(),
            "boundary": None if self.boundary is None else self.boundary.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "sg_optimizer": None if self.sg_optimizer is None else self.sg_optimizer.state_dict(),
            "update_rng": self._update_rng.getstate(),
            "numerics": self._numerics.state_dict(),
            "late_targets": None if self._late is None else self._late.state_dict(),
            "clock": self._clock,
            "stats": stats,
            # Gradients a GPipe group has accumulated so far (a chunk may end inside a group).
            "accumulated": [p.grad for p in self.module.parameters()] if self.micro_batches > 1 else None,
            "accumulated_ok": self._group_ok,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        if self.boundary is not None:
            self.boundary.load_state_dict(state["boundary"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.sg_optimizer is not None:
            self.sg_optimizer.load_state_dict(state["sg_optimizer"])
        if isinstance(state["update_rng"], tuple):  # older checkpoints: a torch generator's state
            self._update_rng.setstate(state["update_rng"])
        if "numerics" in state:
            self._numerics.load_state_dict(state["numerics"])
        self._group_ok = state.get("accumulated_ok")
        if self._late is not None:
            self._late.load_state_dict(state["late_targets"])
        self._clock = state["clock"]
        if state.get("accumulated") is not None:
            for p, g in zip(self.module.parameters(), state["accumulated"], strict=True):
                p.grad = None if g is None else g.to(p.device)
        for key, value in state["stats"].items():
            if isinstance(getattr(self.stats, key, None), Histogram):
                value = Histogram(tuple(value["bounds"]), list(value["counts"]), value["total"])
            setattr(self.stats, key, value)
        self._pending.clear()

    def _evict_stale(self) -> None:
        while len(self._pending) > self.window:
            self._pending.popitem(last=False)
            self.stats.evicted_steps += 1
