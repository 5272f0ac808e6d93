"""No host read-backs in the stage hot path, proved on the CPU.

Every read of a tensor's value by the host (``.item()``, ``float(t)``, ``bool(t)``,
``if t:``, ...) goes through ``aten._local_scalar_dense`` on any device; on a GPU each one
makes the CPU wait for every queued kernel. core/host_sync.py counts them (and device to
host copies, ``tolist``, ``numpy``) with a dispatch mode, so this CPU test fails wherever
the GPU would stall.
"""

from __future__ import annotations

import pytest
import torch
from helpers import stages_for

from dni_dist.core.host_sync import count_host_syncs
from dni_dist.data import batches
from dni_dist.engines.local import LocalEngine

CASES = {
    "sg-true": ("method=sg", "sg.target=true"),
    "sg-bootstrap": ("method=sg", "sg.target=bootstrap"),
    "sg-lambda-mlp": ("method=sg", "sg.target=lambda", "sg.kind=mlp", "segments=4"),
    "sg-clip-stochastic": ("method=sg", "sg.clip=0.5", "update_prob=0.5"),
    "sg-late-targets": ("method=sg", "sg.delay=4"),  # refresh, reliability gate, delay-aware lr
    "sg-stash-bounded": ("method=sg", "sg.delay=4", "stash_versions=1"),
    "sg-prop": ("method=sg-prop",),
    "backprop": ("method=backprop",),
    "backprop-gpipe-sgd": ("method=backprop", "dist.micro_batches=2", "optim.name=sgd"),
    "fa": ("method=fa",),
    "dfa": ("method=dfa",),
    "kickback": ("method=kickback",),
    "ddg": ("method=ddg",),
    "sg-bf16": ("method=sg", "precision=bf16"),
    "dfa-bf16": ("method=dfa", "precision=bf16"),
}


def test_the_counter_sees_every_kind_of_read_back() -> None:
    t = torch.ones(3)
    with count_host_syncs() as counts:
        t.sum().item()
        float(t[0])
        int(t[1])
        bool(t[2] > 0)
        if t.all():
            t.tolist()
    assert counts["scalar read"] == 5 and counts["tolist"] == 1


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_training_steps_read_nothing_back_to_the_host(overrides: tuple[str, ...]) -> None:
    stages, data = stages_for("segments=3", *overrides)
    engine = LocalEngine(stages, delay=next((int(o.split("=")[1]) for o in overrides if "delay" in o), 0))

    def fail(kind: str) -> None:
        raise AssertionError(f"a host read-back ({kind}) in the hot path")

    order = batches(data.x_train, data.y_train, 32, seed=0, epoch=0)
    with count_host_syncs(fail) as counts:
        losses = [engine.train_step(x, y) for _, (x, y) in zip(range(8), order, strict=False)]
        engine.drain()
    assert sum(counts.values()) == 0
    # Read at poll time: the losses in one go, each stage's flags in one go.
    with count_host_syncs() as counts:
        values = torch.stack(losses).tolist()
        engine.check_numerics()
    assert sum(counts.values()) == 1 + len(stages) and all(v == v for v in values)
    assert sum(s.stats.summary()["updates"] for s in stages) > 0


def test_non_finite_flags_are_judged_at_poll_time_in_event_order(monkeypatch) -> None:
    from dni_dist.core import numerics
    from dni_dist.core.numerics import NonFiniteLog, NumericFault

    log = NonFiniteLog(stage=1, limit=3)
    bad, good = torch.tensor(False), torch.tensor(True)
    for step, ok in [(0, good), (1, bad), (1, bad), (2, good), (3, bad), (4, bad)]:
        log.record(step, "activations", ok)
    log.check()  # bad steps 1, 3, 4: two in a row at most
    assert log.count == 3
    log.record(5, "losses", bad)
    with pytest.raises(NumericFault, match=r"stage 1: 3 steps in a row \(to step 5\) had non-finite losses"):
        log.check()
    # A caller that never polls still has its flags judged (and its memory bounded).
    monkeypatch.setattr(numerics, "CHECK_EVERY", 4)
    quiet = NonFiniteLog(stage=0, limit=2)
    for step in range(4):
        quiet.record(step, "activations", good)
    assert quiet._steps == [] and quiet.count == 0


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_a_masked_step_is_no_step_even_the_first(name: str) -> None:
    from dni_dist.builder import make_optimizer
    from dni_dist.config import OptimConfig
    from dni_dist.core.numerics import masked_step

    masked, plain = torch.nn.Parameter(torch.ones(300)), torch.nn.Parameter(torch.ones(300))
    fused = make_optimizer([masked], OptimConfig(name=name, lr=0.1))
    reference = (torch.optim.Adam if name == "adam" else torch.optim.SGD)(
        [plain], **{k: v for k, v in fused.defaults.items() if k in ("lr", "momentum", "weight_decay")}
    )
    masked.grad = torch.full((300,), float("nan"))
    masked_step(fused, torch.tensor(False))  # skipped on the device: weights and state as before
    for i in range(3):
        masked.grad, plain.grad = torch.full((300,), 0.5 * (i + 1)), torch.full((300,), 0.5 * (i + 1))
        masked_step(fused, torch.tensor(True))
        reference.step()
    torch.testing.assert_close(masked.detach(), plain.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_finds_any_nan_or_infinity_and_passes_large_finite_values(dtype: torch.dtype) -> None:
    from dni_dist.core.numerics import all_finite

    big = torch.finfo(dtype).max / 4  # float16's largest values sum without overflow in float32
    x = torch.full((8, 16), big if dtype == torch.float16 else 1e3, dtype=dtype)
    assert bool(all_finite(x)) and bool(all_finite(-x))
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[5, 11] = bad
        assert not bool(all_finite(y)), bad
    mixed = x.clone()
    mixed[0, 0], mixed[0, 1] = float("inf"), float("-inf")  # inf - inf: NaN, still caught
    assert not bool(all_finite(mixed))
    # A check adds nothing to a step's graph (what a pending step holds is measured from it).
    assert all_finite(torch.ones(3, requires_grad=True) * 2).grad_fn is None
