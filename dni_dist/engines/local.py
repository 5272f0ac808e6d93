"""The local engine: every stage in one process, in lockstep. The reference semantics.

A step is run to completion before the next one starts: the data batch enters stage 0,
and messages are routed first-in first-out until none is left. Each stage therefore sees
its events of step s in causal order and all of them before step s+1; any engine that
keeps that per-stage order computes exactly the same parameters.

With ``delay=D > 0`` (``sg.delay``) the engine instead holds every message that an
unlocked stage learns from (SG targets, bootstrapped or true, and the delayed gradients of
``ddg``) and delivers it after step s + D, in order: the staleness an asynchronous
pipeline of depth D would impose, made deterministic. Locked methods wait for their
signal by definition, so theirs are never held.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import torch

from dni_dist.core.messages import Kind, Message
from dni_dist.core.pending import PendingMeter
from dni_dist.core.stage import Stage


class LocalEngine:
    def __init__(self, stages: list[Stage], delay: int = 0) -> None:
        if [s.index for s in stages] != list(range(len(stages))):
            raise ValueError("the local engine needs every stage, in order")
        if delay < 0:
            raise ValueError(f"delay={delay} must be >= 0")
        self.stages = stages
        self.step = 0
        self.delay = delay
        self._held: deque[Message] = deque()  # targets waiting for their delivery step
        # What a waiting step holds, per stage (summary.json); lockstep needs no in-flight limit.
        self.meters = [PendingMeter() for _ in stages]

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One lockstep step; returns the top stage's loss for this batch, a 0-dim tensor on
        its device (reading it back every step would make the CPU wait for the device)."""
        step = self.step
        self.step += 1
        queue: deque[Message] = deque()
        self._input(self.stages[0], step, x, y, queue)
        self._route(queue, now=step)
        while self._held and self._held[0].step + self.delay <= step:
            self._route(deque([self._held.popleft()]), now=step)
        return self.stages[-1].take_loss_tensors()[-1]

    def drain(self) -> None:
        """Deliver every held target now (a pipeline drained at a snapshot or the end)."""
        while self._held:
            self._route(deque([self._held.popleft()]), now=None)

    def _route(self, queue: deque[Message], now: int | None) -> None:
        """Deliver messages first-in first-out until none is left. With a delay, a target of
        an unlocked stage is held while ``now`` is earlier than its step + delay (``now=None``:
        never held)."""
        while queue:
            msg = queue.popleft()
            stage = self.stages[msg.dst]
            if msg.kind is Kind.ACTIVATION:
                assert msg.labels is not None
                self._input(stage, msg.step, msg.tensor, msg.labels, queue)
            elif now is not None and msg.step + self.delay > now and not stage.locked:
                self._held.append(msg)  # a target an unlocked stage learns from, not a locked one's wait
            else:
                queue.extend(stage.on_message(msg))

    def _input(self, stage: Stage, step: int, x: torch.Tensor, y: torch.Tensor, queue: deque[Message]) -> None:
        # send up first: the update does not hold it back
        queue.extend(self.meters[stage.index].forward(stage, step, x, y))
        queue.extend(stage.update(step))

    def check_numerics(self) -> None:
        """Every stage's non-finite check (see Stage.check_numerics): at poll time."""
        for stage in self.stages:
            stage.check_numerics()

    def train(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
        losses = [self.train_step(x, y) for x, y in batches]
        self.check_numerics()
        return torch.stack(losses).tolist() if losses else []

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        outputs = []
        for start in range(0, len(x), batch_size):
            h = x[start : start + batch_size]
            for stage in self.stages:
                h = stage.predict(h)
            outputs.append(h)
        return torch.cat(outputs)
