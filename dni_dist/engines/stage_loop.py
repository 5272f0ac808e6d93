"""The stage loop: one stage driven by the messages a transport delivers.

``async`` is the unlocked schedule of DESIGN.md: stage 0 feeds a new batch whenever it
may (an ``sg`` stage as long as fewer than its in-flight limit of steps wait for targets:
``max_in_flight``, or with 0 what the pipeline needs within ``pending_memory`` bytes, see
core/pending.py; a locked stage only when nothing is pending), every stage forwards and
sends up at once, updates from its SG, and trains its SG whenever a target arrives.
Memory stays bounded: the transport's queues are bounded and block the sender, pending
steps are capped at stage 0, and a stage above holds its next input while its waiting
steps fill ``pending_memory``.
With ``micro_batches`` M > 1 (pipelined backprop, GPipe), a locked stage also takes inputs
of the group of M steps it is working on (no update comes between them), never one of the
next group before the group's update: stage 0 feeds a group's M steps, then drains.

``lockstep`` processes, at every stage, all events of step s (its input, then the
messages from above for s, in order) before anything of step s+1; messages that arrive
early wait in a small buffer. That is the local engine's per-stage order, so the result
is the same to floating-point tolerance.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dni_dist.core.messages import Kind, Message
from dni_dist.core.pending import AUTO, PendingMeter, in_flight_limit, pending_budget
from dni_dist.core.stage import Stage
from dni_dist.transports.base import Transport, TransportError

SCHEDULES = ("async", "lockstep")


@dataclass
class EpochReport:
    wall_seconds: float
    compute_seconds: float
    inputs: int
    messages: int
    max_queued: int
    max_pending: int


def adopt_thread_count() -> None:
    """Give the calling thread the process's torch thread count. A thread new to torch runs
    its matmuls on OpenMP's default team (every core) until its first op through torch's own
    parallel loop; besides oversubscribing a stage's cores, such a matmul rounds differently
    from one on the configured count (a (10, 64) x (64, 256) product did, on one thread)."""
    torch.set_num_threads(torch.get_num_threads())


class StageLoop:
    def __init__(
        self,
        stage: Stage,
        transport: Transport,
        schedule: str = "async",
        timeout: float = 120.0,
        slow_seconds: float = 0.0,
        max_in_flight: int = AUTO,
        slow_jitter: float = 0.0,
        pending_memory: int = AUTO,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule {schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
        self.stage = stage
        self.transport = transport
        self.schedule = schedule
        self.timeout = timeout
        self.slow_seconds = slow_seconds  # test hook: pretend each input costs this much more
        self.slow_jitter = slow_jitter  # ... plus up to this much, uniformly at random
        self._jitter = random.Random(stage.index)
        self.meter = PendingMeter()
        self._requested = (max_in_flight, pending_memory)
        # Locked stages keep their rule: one step (or one GPipe group) at a time.
        self.max_in_flight, self.in_flight_bound = (stage.micro_batches, "locked") if stage.locked else (0, "")
        # Above stage 0, the budget alone bounds an unlocked stage's waiting steps (None: no
        # bound yet): its steps may hold more than stage 0's (a graph, stashed weights).
        self.memory_steps: int | None = None
        if not stage.locked:
            self._resolve_limit(None)
        self._early: list[Message] = []
        self._max_queued = 0
        self._max_pending = 0

    def run_epoch(
        self, first_step: int, steps: int, inputs: Iterator[tuple[torch.Tensor, torch.Tensor]] | None
    ) -> EpochReport:
        """Process this epoch's ``steps`` inputs and every message they cause at this stage."""
        stage = self.stage
        if (stage.index == 0) != (inputs is not None):
            raise ValueError("stage 0 reads the data; every other stage reads activations")
        adopt_thread_count()  # an epoch may run on a thread new to torch (a Ray executor's)
        if stage.index > 0:
            self.transport.expect(stage.index - 1, steps)
        per_step = stage.down_messages_per_step
        if per_step:
            self.transport.expect(stage.down_source, steps * per_step)
        started = time.perf_counter()
        compute_before = stage.stats.compute_seconds
        self._max_queued = self._max_pending = 0
        if self.schedule == "lockstep":
            messages = self._lockstep(first_step, steps, per_step, inputs)
        else:
            messages = self._async(first_step, steps, per_step, inputs)
        self.transport.flush(self.timeout)
        stage.check_numerics()  # the epoch's non-finite flags, read back once
        return EpochReport(
            wall_seconds=time.perf_counter() - started,
            compute_seconds=stage.stats.compute_seconds - compute_before,
            inputs=steps,
            messages=messages,
            max_queued=self._max_queued,
            max_pending=self._max_pending,
        )

    # ------------------------------------------------------------ schedules
    def _async(self, first: int, steps: int, per_step: int, inputs: Iterator | None) -> int:
        stage = self.stage
        fed = 0
        handled = 0
        held: deque[Message] = deque()  # inputs this stage may not start yet (locked, or over budget)
        while fed < steps or handled < steps * per_step:
            if inputs is not None:
                msg = self.transport.try_recv()  # targets first: they free pending steps
                may_feed = stage.pending_steps < self.max_in_flight and stage.takes_input(first + fed)
                if msg is None and fed < steps and may_feed:
                    x, y = next(inputs)
                    handled += self._input(first + fed, x, y, take_targets=True)
                    fed += 1
                    continue
                if msg is None:
                    msg = self.transport.recv(self.timeout)
            else:
                if held and self._takes_input(held[0].step):
                    msg = held.popleft()
                else:
                    msg = self.transport.recv(self.timeout)
                    # A locked stage finishes its step (or group) first: its update would
                    # change the weights under the next step's graph. Direct errors make this
                    # real: stage 0 can get its error, and feed the next step, before we get ours.
                    if msg.kind is Kind.ACTIVATION and (held or not self._takes_input(msg.step)):
                        held.append(msg)
                        continue
                if msg.kind is Kind.ACTIVATION:
                    self._check_order(msg.step, first + fed)
                    self._input(msg.step, msg.tensor, msg.labels)
                    fed += 1
                    continue
            self._message(msg)
            handled += 1
        return handled

    def _lockstep(self, first: int, steps: int, per_step: int, inputs: Iterator | None) -> int:
        for i in range(steps):
            step = first + i
            if inputs is not None:
                x, y = next(inputs)
            else:
                msg = self._next(step)
                if msg.kind is not Kind.ACTIVATION:
                    raise TransportError(
                        f"stage {self.stage.index}: a {msg.kind.value} for step {step} came before its input"
                    )
                x, y = msg.tensor, msg.labels
            self._input(step, x, y)
            for _ in range(per_step):
                self._message(self._next(step))
        return steps * per_step

    def _next(self, step: int) -> Message:
        """The next message of ``step``; messages of later steps wait in ``_early``."""
        for i, msg in enumerate(self._early):
            if msg.step == step:
                return self._early.pop(i)
        while True:
            msg = self.transport.recv(self.timeout)
            if msg.step == step:
                return msg
            if msg.step < step:
                raise TransportError(f"stage {self.stage.index}: step {msg.step} arrived after step {step} began")
            self._early.append(msg)

    # ---------------------------------------------------------------- events
    def _input(self, step: int, x: torch.Tensor, y: torch.Tensor, take_targets: bool = False) -> int:
        """Forward ``step``, send it up, update. ``take_targets`` (stage 0, async): targets
        that arrived during the forward are handled between the send and the update (any of
        this very step after the update), so the update uses an SG that learned from the
        newest target, and a step whose older steps are all done by then is the oldest
        waiting one at its update, whose SG output can serve its training
        (Stage.keeps_sg_prediction). Returns how many messages it handled."""
        measured = self.meter.step_bytes is not None
        for out in self.meter.forward(self.stage, step, x, y):  # send up before updating
            self.transport.send(out)
        if not measured and self.meter.step_bytes is not None and not self.stage.locked:  # the first step told
            self._resolve_limit(pending_budget(self._requested[1], x.device))
        if self.slow_seconds or self.slow_jitter:  # simulated work: counted as compute, like the real kind
            pause = self.slow_seconds + self._jitter.uniform(0.0, self.slow_jitter)
            time.sleep(pause)
            self.stage.stats.compute_seconds += pause
        handled = 0
        own: list[Message] = []  # this step's own targets (a fast top): after its update
        while take_targets and (msg := self.transport.try_recv()) is not None:
            if msg.step == step:
                own.append(msg)
            else:
                self._message(msg)
                handled += 1
        handled += len(own)
        for out in self.stage.update(step):
            self.transport.send(out)
        for msg in own:
            self._message(msg)
        self._sample()
        return handled

    def _message(self, msg: Message) -> None:
        for out in self.stage.on_message(msg):
            self.transport.send(out)
        self._sample()

    def _sample(self) -> None:
        self._max_queued = max(self._max_queued, self.transport.queued)
        self._max_pending = max(self._max_pending, self.stage.pending_steps)

    def _takes_input(self, step: int) -> bool:
        """May a stage above 0 start ``step``? A locked one by its rule; an unlocked one while
        its waiting steps fit the memory budget. Holding the activation cannot deadlock: every
        waiting step was sent up already, so its target comes (the top never holds)."""
        stage = self.stage
        if not stage.takes_input(step):
            return False
        return self.memory_steps is None or stage.pending_steps < self.memory_steps

    def _resolve_limit(self, budget: int | None) -> None:
        """The in-flight limit; ``budget`` None: before the first step, nothing measured yet."""
        stage, meter = self.stage, self.meter
        self.max_in_flight, self.in_flight_bound = in_flight_limit(
            self._requested[0],
            stage.num_stages,
            stage.target_mode,
            budget or 0,
            meter.step_bytes,
            meter.stash_bytes,
            meter.stash_versions,
        )
        if budget and meter.step_bytes:  # a bounded weight stash: steps beyond it hold less
            self.memory_steps = meter.steps_within(budget)

    def pending_summary(self) -> dict[str, int | str | None]:
        """summary.json's per-stage in-flight and pending-memory keys (the limit is stage 0's)."""
        feeds = self.stage.index == 0
        return {
            "in_flight_limit": self.max_in_flight if feeds else None,
            "in_flight_bound": self.in_flight_bound if feeds else None,
            "pending_step_limit": self.memory_steps,  # the budget in steps (stage 0: within in_flight_limit)
            **self.meter.summary(),
        }

    def _check_order(self, got: int, expected: int) -> None:
        if got != expected:
            raise TransportError(f"stage {self.stage.index}: expected the input of step {expected}, got step {got}")
