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
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from dni_dist.histogram import STALENESS_BOUNDS, STEP_SECONDS_BOUNDS, Histogram
from dni_dist.messages import Kind, Message
from dni_dist.methods import Boundary, SyntheticBoundary
from dni_dist.tasks import Task

TARGET_MODES: tuple[str, ...] = ("bootstrap", "true", "lambda")


@dataclass
class _Pending:
    """What a stage keeps of a step until the targets it waits for have arrived."""

    x: torch.Tensor
    h: torch.Tensor
    context: torch.Tensor
    params: list[torch.Tensor]  # the tensors h's graph was built from (module params or a stash)
    forward_at: int
    bootstrap: torch.Tensor | None = None
    seconds: float = 0.0  # compute spent on this step so far (forward, update, targets)


@dataclass
class StageStats:
    """Running counters of one stage; ``summary()`` is what summary.json reports."""

    steps: int = 0
    # What each update of the segment waited for (the unified table's locking, measured):
    # nothing (unlocked), the gradient from the stage above, or the output error from the top.
    updates_without_waiting: int = 0
    updates_after_grad: int = 0
    updates_after_error: int = 0
    updates: int = 0
    skipped_updates: int = 0
    dropped_targets: int = 0
    evicted_steps: int = 0
    sg_updates: int = 0
    sg_loss_sum: float = 0.0
    sg_cosine_sum: float = 0.0
    staleness_sum: int = 0
    compute_seconds: float = 0.0
    # Top stage: losses of the steps since an engine last took them (take_losses), so a
    # long run does not keep one float per step forever.
    losses: list[float] = field(default_factory=list)
    # Distributions for the metrics endpoint (not in summary()): compute seconds per
    # completed step, and SG target staleness in steps.
    step_seconds: Histogram = field(default_factory=lambda: Histogram(STEP_SECONDS_BOUNDS))
    staleness: Histogram = field(default_factory=lambda: Histogram(STALENESS_BOUNDS))

    def summary(self) -> dict[str, float | int | None]:
        n = self.sg_updates
        return {
            "steps": self.steps,
            "updates": self.updates,
            "updates_without_waiting": self.updates_without_waiting,
            "updates_after_grad": self.updates_after_grad,
            "updates_after_error": self.updates_after_error,
            "skipped_updates": self.skipped_updates,
            "dropped_targets": self.dropped_targets,
            "evicted_steps": self.evicted_steps,
            "sg_updates": n,
            "sg_loss": self.sg_loss_sum / n if n else None,
            "sg_cosine": self.sg_cosine_sum / n if n else None,
            "mean_staleness": self.staleness_sum / n if n else None,
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
    ) -> None:
        if target_mode not in TARGET_MODES:
            raise ValueError(f"target mode {target_mode!r} is unknown; use one of {', '.join(TARGET_MODES)}")
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
        self.stats = StageStats()
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._update_rng = torch.Generator().manual_seed(seed * 1009 + index)
        self._clock = 0
        learned = isinstance(boundary, SyntheticBoundary) and not boundary.update_locked
        # Weight stashing is needed only where the segment updates before it must pass the
        # true gradient down: an unlocked SG stage that has a stage below and true targets.
        self._stash = learned and index > 0 and target_mode != "bootstrap"

    # ----------------------------------------------------------------- events
    def forward(self, step: int, x: torch.Tensor, labels: torch.Tensor) -> list[Message]:
        started = time.perf_counter()
        self.module.train()
        self.stats.steps += 1
        self._clock += 1
        context = self.task.context(labels)
        needs_input_grad = self.index > 0
        x = x.detach().requires_grad_(needs_input_grad)
        if self._stash:
            params = [p.detach().clone().requires_grad_(True) for p in self.module.parameters()]
            names = [n for n, _ in self.module.named_parameters()]
            h = torch.func.functional_call(self.module, dict(zip(names, params, strict=True)), (x,))
        else:
            params = list(self.module.parameters())
            h = self.module(x)
        if self.is_top:
            out = self._top_step(step, x, h, labels, params)
        else:
            pending = self._pending[step] = _Pending(x, h, context, params, self._clock)
            self._evict_stale()
            out = [Message(Kind.ACTIVATION, step, self.index, self.index + 1, h.detach(), labels)]
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
        signal = self.boundary.signal(pending.h, pending.context, None)
        want_bootstrap = self.index > 0 and self.target_mode != "true"
        input_grad = self._apply(pending, signal, want_input_grad=want_bootstrap, keep_graph=self._stash)
        self.stats.updates_without_waiting += 1
        out = []
        if input_grad is not None:
            out.append(Message(Kind.BOOTSTRAP, step, self.index, self.index - 1, input_grad))
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
        self.module.eval()
        return self.module(x)

    def take_losses(self) -> list[float]:
        """The top stage's per-step losses since the last call, oldest first."""
        losses, self.stats.losses = self.stats.losses, []
        return losses

    @property
    def pending_steps(self) -> int:
        return len(self._pending)

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
        return not self.is_top and self.boundary.update_locked

    # -------------------------------------------------------------- internals
    def _top_step(
        self, step: int, x: torch.Tensor, output: torch.Tensor, labels: torch.Tensor, params: list[torch.Tensor]
    ) -> list[Message]:
        loss = self.task.loss(output, labels)
        self.stats.losses.append(float(loss.detach()))
        direct = self.direct_error
        extra = [output] if direct else []
        extra += [x] if (self.index > 0 and not direct) else []
        grads = torch.autograd.grad(loss, params + extra, allow_unused=True)
        self._step_optimizer(grads[: len(params)])
        if self.index == 0:
            return []
        if direct:
            error = grads[len(params)]
            return [Message(Kind.ERROR, step, self.index, k, error) for k in range(self.index)]
        return [Message(Kind.GRAD, step, self.index, self.index - 1, grads[-1])]

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
        self._train_sg(pending, target)
        out = []
        if self.target_mode != "bootstrap" and self.index > 0:
            (down,) = torch.autograd.grad(pending.h, pending.x, msg.tensor)
            out.append(Message(Kind.GRAD, msg.step, self.index, self.index - 1, down))
        del self._pending[msg.step]
        return out

    def _on_locked_signal(self, msg: Message, pending: _Pending) -> list[Message]:
        boundary = self.boundary
        expected = Kind.ERROR if boundary.waits_for == "error" else Kind.GRAD
        if msg.kind is not expected:
            raise ValueError(f"stage {self.index} ({boundary.name}) got a {msg.kind.value}, expected {expected.value}")
        signal = boundary.signal(pending.h, pending.context, msg.tensor)
        if boundary.learned:  # sg-prop: the SG learns from the same target it was just given
            self._train_sg(pending, msg.tensor)
        send_down = self.index > 0 and boundary.waits_for == "grad"
        input_grad = self._apply(pending, signal, want_input_grad=send_down, keep_graph=False)
        if msg.kind is Kind.ERROR:
            self.stats.updates_after_error += 1
        else:
            self.stats.updates_after_grad += 1
        del self._pending[msg.step]
        if input_grad is None:
            return []
        return [Message(Kind.GRAD, msg.step, self.index, self.index - 1, input_grad)]

    def _apply(
        self, pending: _Pending, signal: torch.Tensor, want_input_grad: bool, keep_graph: bool
    ) -> torch.Tensor | None:
        """Backprop ``signal`` through the segment; step the optimiser; maybe return dL/dx."""
        inputs = pending.params + ([pending.x] if want_input_grad else [])
        grads = torch.autograd.grad(pending.h, inputs, signal, retain_graph=keep_graph, allow_unused=True)
        self._step_optimizer(grads[: len(pending.params)])
        return grads[-1] if want_input_grad else None

    def _step_optimizer(self, grads: tuple[torch.Tensor | None, ...]) -> None:
        if self.optimizer is None:
            return
        # Stochastic updates (DNI paper): each stage updates with probability p per step.
        # The draw happens every step so the sequence does not depend on p's history.
        draw = float(torch.rand((), generator=self._update_rng))
        if draw >= self.update_prob:
            self.stats.skipped_updates += 1
            return
        for p, g in zip(self.module.parameters(), grads, strict=True):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.stats.updates += 1

    def _train_sg(self, pending: _Pending, target: torch.Tensor) -> None:
        boundary = self.boundary
        assert isinstance(boundary, SyntheticBoundary) and self.sg_optimizer is not None
        with torch.enable_grad():
            loss, prediction = boundary.sg_loss(pending.h, pending.context, target)
            self.sg_optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.sg_optimizer.step()
        scaled = target.flatten() * target.shape[0]
        cosine = torch.nn.functional.cosine_similarity(prediction.flatten(), scaled, dim=0, eps=1e-12)
        self.stats.sg_updates += 1
        self.stats.sg_loss_sum += float(loss.detach())
        self.stats.sg_cosine_sum += float(cosine)
        staleness = self._clock - pending.forward_at
        self.stats.staleness_sum += staleness
        self.stats.staleness.observe(staleness)

    def _evict_stale(self) -> None:
        while len(self._pending) > self.window:
            self._pending.popitem(last=False)
            self.stats.evicted_steps += 1
