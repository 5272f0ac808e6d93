"""A discrete-event model of K-stage training: samples/s per method from per-stage costs.

Resources. Each stage is one device with ONE compute stream: its tasks (forward, backward,
SG update, SG training) run one at a time, never in parallel. Each direction of each cut
(k -> k+1 up, k+1 -> k down) is a link: a message occupies it for ``bytes / bandwidth``
(messages on one link queue behind each other) and arrives ``latency`` later. Links run
beside compute: a device computes while its messages are on the wire (compute and
communication overlap), and sending costs the device no compute time. Costs are per batch
and divided by the profile's device speed.

Methods (``steps`` batches each; a step is done when its last task is):

- ``backprop`` (naive model parallel): stage 0 feeds a batch only when the previous one
  finished its backward everywhere, so forward up, backward down, strictly one at a time.
- ``dni`` (``sg``, async schedule of ``engines/stage_loop.py``): stage k's step is
  forward (with weight stashing for true and lambda targets), send up, then at once the
  SG update (SG forward and its backprop through the segment). ``target_mode``:
  ``true``: when the true gradient for an old step arrives, the stage trains its SG (and,
  above stage 0, passes that gradient on down through the stashed weights).
  ``bootstrap``: stage k > 0 sends its input gradient down right after its update; that
  is stage k-1's whole target (SG training, nothing passed on), so stage 0's step is done
  one hop up and back, without waiting for the top. ``lambda``: both: the bootstrap
  target crosses the link (stored on arrival, no compute), the step completes when the
  true gradient does, as with ``true``. Stage 0 feeds a new batch while fewer than its
  in-flight limit of steps await targets (``max_in_flight``; 0: core/pending.py's
  automatic limit, the runtime's default) and serves arrived targets first; other stages
  serve arrivals in order (one inbox). The top does forward + loss + backward and sends
  the true gradient down.
- ``gpipe``: a mini-batch is M batches (micro-batches); all M forwards, then the M
  backwards in reverse order; stage 0 starts the next mini-batch only after its last
  backward (flush). With equal stages and free links the bubble is (K-1)/(M+K-1).
- ``1f1b``: the steady state of the one-forward-one-backward schedule without flushes
  (PipeDream style, weight stashing): stage 0 keeps at most ``in_flight`` (default K)
  batches unfinished, every stage runs a ready backward before a ready forward, and the
  top fuses forward and backward. With a flush every M batches it would have GPipe's
  bubble; it differs from GPipe in memory, not time.
- ``ddp`` (analytic, weak scaling): K replicas of the whole model, each a batch per step;
  ring allreduce of the gradients, 2(K-1)/K * bytes / bandwidth + 2(K-1) * latency over
  the ring's slowest link, either after the backward or overlapped with it (then only
  the part longer than the backward shows). Gradient bytes = parameter bytes.

Memory is modelled for dni only, and only as the runtime bounds it (``pending_memory``):
stage 0's in-flight limit and, above stage 0, an activation held while a stage's waiting
steps fill the budget (``StageCosts.pending_bytes`` each).

Not modelled: bounded transport queues (stage 0's cap bounds the work in flight anyway),
other methods' memory, micro-batch efficiency (GPipe and 1F1B micro-batches are whole batches, so
each costs what a measured batch costs), the optimiser step saved by accumulating M
micro-batches, direct-error methods (DFA, Kickback), and per-message CPU cost on the
sending or receiving device (it is part of the measured link latency instead).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dni_dist.core.pending import AUTO, in_flight_limit

METHODS = ("backprop", "dni", "gpipe", "1f1b", "ddp")


@dataclass(frozen=True)
class StageCosts:
    """Seconds per batch on the measured device, and bytes per message, of one stage.

    ``backward_s``: backprop's backward (parameter and input gradients, optimiser step).
    ``sg_s``: the DNI update (SG forward, its backprop through the segment, optimiser step).
    ``sg_train_s``: SG training on an arrived target (and, above stage 0, the true
    gradient's pass down through the segment). ``dni_forward_s``: the DNI forward (with
    weight stashing); None means ``forward_s``. At the top, ``forward_s + backward_s`` is
    the whole step (loss included) and the SG fields are unused.
    ``activation_bytes``: the message this stage sends up; ``grad_bytes``: the one it gets
    back down (the gradient w.r.t. its output); ``param_bytes``: its gradients' size.
    ``pending_bytes``: what one step waiting for its target holds here (stage 0's bounds the
    automatic in-flight limit, as ``core.pending.PendingMeter`` measures it in a run).
    """

    forward_s: float
    backward_s: float
    sg_s: float = 0.0
    sg_train_s: float = 0.0
    activation_bytes: int = 0
    grad_bytes: int = 0
    param_bytes: int = 0
    dni_forward_s: float | None = None
    pending_bytes: int = 0

    @property
    def dni_forward(self) -> float:
        return self.forward_s if self.dni_forward_s is None else self.dni_forward_s


@dataclass(frozen=True)
class Link:
    """One direction of a link: one-way latency (software overhead included) and bandwidth."""

    latency_s: float = 0.0
    bandwidth_Bps: float = math.inf

    def seconds(self, nbytes: int) -> float:
        return nbytes / self.bandwidth_Bps if math.isfinite(self.bandwidth_Bps) else 0.0


@dataclass(frozen=True)
class Profile:
    """Hardware: device speed relative to the measured machine and the links between stages.

    Stages fill nodes in order, ``devices_per_node`` per node: a cut inside a node uses
    ``intra``, a cut between nodes ``inter``.
    """

    name: str = "measured"
    speed: float = 1.0
    intra: Link = field(default_factory=Link)
    inter: Link = field(default_factory=Link)
    devices_per_node: int = 1 << 30

    def cut_link(self, k: int) -> Link:
        """The link between stage k and stage k+1."""
        same = k // self.devices_per_node == (k + 1) // self.devices_per_node
        return self.intra if same else self.inter

    def ring_link(self, devices: int) -> Link:
        return self.intra if devices <= self.devices_per_node else self.inter


@dataclass
class SimResult:
    method: str
    steps: int
    batch: int
    makespan_s: float
    finish_s: list[float]  # each step's finish time, sorted

    @property
    def samples_per_second(self) -> float:
        """Over the whole run: pipeline fill and drain included (what a measured epoch sees)."""
        return self.steps * self.batch / self.makespan_s


# ------------------------------------------------------------------- the engine
Task = tuple[float, Callable[[], None]]  # (seconds, what happens when it ends)


class _Engine:
    """Event queue, one compute stream per device, one FIFO wire per link direction."""

    def __init__(self, stages: int, links: list[Link], pick: Callable[[int], Task | None]) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._busy = [False] * stages
        self._links = links
        self._wire_free: dict[tuple[int, int], float] = {}
        self._pick = pick
        self.finish: list[float] = []

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, self._seq, fn))
        self._seq += 1

    def send(self, src: int, dst: int, nbytes: int, arrive: Callable[[], None]) -> None:
        link = self._links[min(src, dst)]
        start = max(self.now, self._wire_free.get((src, dst), 0.0))
        self._wire_free[(src, dst)] = start + link.seconds(nbytes)
        self.at(start + link.seconds(nbytes) + link.latency_s, lambda: (arrive(), self.kick(dst)))

    def kick(self, dev: int) -> None:
        if self._busy[dev]:
            return
        task = self._pick(dev)
        if task is None:
            return
        seconds, done = task
        self._busy[dev] = True

        def end() -> None:
            self._busy[dev] = False
            done()
            self.kick(dev)

        self.at(self.now + seconds, end)

    def done(self) -> None:
        self.finish.append(self.now)

    def run(self, stages: int) -> float:
        for dev in range(stages):
            self.kick(dev)
        while self._events:
            self.now, _, fn = heapq.heappop(self._events)
            fn()
        return self.now


# ------------------------------------------------------------ stage-loop methods
def _stage_loop(
    costs: list[StageCosts],
    links: list[Link],
    speed: float,
    steps: int,
    unlocked: bool,
    cap: int,
    mode: str = "true",
    holds: list[int | None] | None = None,
) -> _Engine:
    """backprop (locked, one step in flight) and dni (unlocked, ``cap`` steps in flight,
    SG targets of ``mode``; stage k > 0 holds an activation while ``holds[k]`` of its steps
    wait for targets: the memory budget, as the stage loop does)."""
    k_top = len(costs) - 1
    holds = holds or [None] * len(costs)
    waiting = [0] * len(costs)  # steps awaiting their target at each stage above 0
    pass_down = mode != "bootstrap"  # true and lambda targets travel on down to stage 0
    bootstraps = unlocked and mode != "true"  # stages above 0 send their input gradient at once
    inbox: list[deque[tuple[str, int]]] = [deque() for _ in costs]
    first: list[deque[Task]] = [deque() for _ in costs]  # the update that follows a forward
    state = {"fed": 0, "pending": 0}
    eng: _Engine

    def forward(k: int, s: int) -> Task:
        c = costs[k]
        if k == k_top:

            def top_done() -> None:
                if k == 0:
                    eng.done()
                else:
                    eng.send(k, k - 1, costs[k - 1].grad_bytes, lambda: inbox[k - 1].append(("grad", s)))

            return (c.forward_s + c.backward_s) / speed, top_done

        def fwd_done() -> None:
            eng.send(k, k + 1, c.activation_bytes, lambda: inbox[k + 1].append(("act", s)))
            if unlocked:
                first[k].append((c.sg_s / speed, lambda: bootstrap(k, s)))

        return (c.dni_forward if unlocked else c.forward_s) / speed, fwd_done

    def bootstrap(k: int, s: int) -> None:
        """After stage k's update: its input gradient goes down as stage k-1's SG target."""
        if not bootstraps or k == 0:
            return
        below = costs[k - 1].grad_bytes
        if mode == "bootstrap":  # the whole target of stage k-1's step
            eng.send(k, k - 1, below, lambda: inbox[k - 1].append(("grad", s)))
        else:  # lambda: stored until the true gradient comes (no compute); it only takes the link
            eng.send(k, k - 1, below, lambda: None)

    def target(k: int, s: int) -> Task:
        c = costs[k]

        def tgt_done() -> None:
            waiting[k] -= k > 0 and unlocked
            if k > 0 and (pass_down or not unlocked):
                eng.send(k, k - 1, costs[k - 1].grad_bytes, lambda: inbox[k - 1].append(("grad", s)))
            elif k == 0:
                state["pending"] -= 1
                eng.done()

        return (c.sg_train_s if unlocked else c.backward_s) / speed, tgt_done

    def pick(k: int) -> Task | None:
        if first[k]:
            return first[k].popleft()
        if k == 0:
            if inbox[0]:  # targets first: they free pending steps
                return target(0, inbox[0].popleft()[1])
            if state["fed"] < steps and state["pending"] < cap:
                s = state["fed"]
                state["fed"] += 1
                state["pending"] += k_top > 0
                return forward(0, s)
            return None
        i = _next_allowed(k)
        if i is None:
            return None
        kind, s = inbox[k][i]
        del inbox[k][i]
        if kind == "act" and unlocked and k < k_top:
            waiting[k] += 1
        return forward(k, s) if kind == "act" else target(k, s)

    def _next_allowed(k: int) -> int | None:
        """The inbox's first message, or with the budget full its first target."""
        full = holds[k] is not None and waiting[k] >= holds[k]
        return next((i for i, (kind, _) in enumerate(inbox[k]) if not (full and kind == "act")), None)

    eng = _Engine(len(costs), links, pick)
    return eng


# -------------------------------------------------------------- pipeline methods
def _pipeline(
    costs: list[StageCosts], links: list[Link], speed: float, steps: int, micro: int, flush: bool, cap: int
) -> _Engine:
    """gpipe (``flush``: M forwards, M backwards, flush) and 1f1b (no flush, ``cap`` in flight)."""
    k_top = len(costs) - 1
    acts: list[deque[int]] = [deque() for _ in costs]
    grads: list[deque[int]] = [deque() for _ in costs]
    state = {"fed": 0, "done0": 0, "top_fwd": 0}
    eng: _Engine

    def send_grad(k: int, s: int) -> None:
        if k > 0:
            eng.send(k, k - 1, costs[k - 1].grad_bytes, lambda: grads[k - 1].append(s))
        else:
            state["done0"] += 1
            eng.done()

    def backward(k: int, s: int) -> Task:
        return costs[k].backward_s / speed, lambda: send_grad(k, s)

    def forward(k: int, s: int) -> Task:
        c = costs[k]
        if k == k_top and not flush:  # 1F1B: the top's forward and backward are one task
            return (c.forward_s + c.backward_s) / speed, lambda: send_grad(k, s)

        def fwd_done() -> None:
            if k < k_top:
                eng.send(k, k + 1, c.activation_bytes, lambda: acts[k + 1].append(s))
                return
            state["top_fwd"] += 1
            if state["top_fwd"] % micro == 0:  # GPipe: the loss of the whole mini-batch, then backwards
                grads[k].extend(range(s, s - micro, -1))

        return c.forward_s / speed, fwd_done

    def may_feed() -> bool:
        fed, done = state["fed"], state["done0"]
        if fed >= steps:
            return False
        if flush:  # a new mini-batch only after the last one's backward ended here
            return fed % micro != 0 or done == fed
        return fed - done < cap

    def pick(k: int) -> Task | None:
        if grads[k]:
            return backward(k, grads[k].popleft())
        if k == 0 and may_feed():
            state["fed"] += 1
            return forward(0, state["fed"] - 1)
        if k > 0 and acts[k]:
            return forward(k, acts[k].popleft())
        return None

    eng = _Engine(len(costs), links, pick)
    return eng


# ------------------------------------------------------------------------- API
def ring_allreduce_s(nbytes: int, devices: int, link: Link) -> float:
    """Ring allreduce: reduce-scatter then all-gather, 2(K-1) steps of bytes/K each."""
    if devices <= 1:
        return 0.0
    return 2 * (devices - 1) / devices * link.seconds(nbytes) + 2 * (devices - 1) * link.latency_s


def ddp_samples_per_second(
    costs: list[StageCosts], devices: int, batch: int, profile: Profile, overlap: bool = True
) -> float:
    """K replicas of the whole model (the stages' costs summed), one batch each per step."""
    forward = sum(c.forward_s for c in costs) / profile.speed
    backward = sum(c.backward_s for c in costs) / profile.speed
    reduce = ring_allreduce_s(sum(c.param_bytes for c in costs), devices, profile.ring_link(devices))
    step = forward + (max(backward, reduce) if overlap else backward + reduce)
    return devices * batch / step


def simulate(
    method: str,
    costs: list[StageCosts],
    batch: int,
    steps: int,
    profile: Profile | None = None,
    max_in_flight: int = AUTO,
    micro_batches: int = 4,
    in_flight: int | None = None,
    target_mode: str = "true",
    pending_memory: int = 0,
) -> SimResult:
    """Run ``steps`` batches of ``method`` over the stages ``costs`` (one per stage).

    ``max_in_flight``: dni's cap at stage 0; 0 (the default) is the runtime's automatic
    limit for ``target_mode``, bounded by ``pending_memory`` bytes (0: no bound) over stage
    0's ``pending_bytes`` (see ``dni_in_flight``). ``micro_batches``: GPipe's M (``steps``
    is rounded up to whole mini-batches). ``in_flight``: 1F1B's cap (default K).
    """
    if method not in METHODS or method == "ddp":
        raise ValueError(f"method {method!r} is not simulated; use one of backprop, dni, gpipe, 1f1b")
    if not costs or steps < 1 or max_in_flight < 0 or micro_batches < 1:
        raise ValueError("need at least one stage, one step, max_in_flight >= 0 and micro_batches >= 1")
    profile = profile or Profile()
    links = [profile.cut_link(k) for k in range(len(costs) - 1)]
    if method in ("backprop", "dni"):
        unlocked = method == "dni"
        cap = dni_in_flight(costs, target_mode, max_in_flight, pending_memory)[0] if unlocked else 1
        holds = [
            max(1, pending_memory // c.pending_bytes) if pending_memory and c.pending_bytes else None for c in costs
        ]
        eng = _stage_loop(costs, links, profile.speed, steps, unlocked, cap, target_mode, holds)
    else:
        flush = method == "gpipe"
        if flush:
            steps = -(-steps // micro_batches) * micro_batches
        cap = in_flight or len(costs)
        eng = _pipeline(costs, links, profile.speed, steps, micro_batches, flush, cap)
    makespan = eng.run(len(costs))
    if len(eng.finish) != steps:
        raise RuntimeError(f"{method}: {len(eng.finish)} of {steps} steps finished (a scheduling bug)")
    return SimResult(method, steps, batch, makespan, sorted(eng.finish))


def dni_in_flight(
    costs: list[StageCosts], target_mode: str = "true", max_in_flight: int = AUTO, pending_memory: int = 0
) -> tuple[int, str]:
    """(stage 0's in-flight limit, what set it), by the runtime's rule (core/pending.py)."""
    budget = pending_memory or (1 << 62)  # 0: memory is not modelled
    return in_flight_limit(max_in_flight, len(costs), target_mode, budget, costs[0].pending_bytes or None)


def steady_samples_per_second(method: str, costs: list[StageCosts], batch: int, steps: int, **kwargs) -> float:
    """The long-run rate, pipeline fill and drain excluded: the extra samples of a run of
    2 x ``steps`` over the extra time it takes (fill and drain are the same in both)."""
    short = simulate(method, costs, batch, steps, **kwargs)
    long = simulate(method, costs, batch, 2 * short.steps, **kwargs)
    return (long.steps - short.steps) * batch / (long.makespan_s - short.makespan_s)
