"""Memory: the per-stage estimate of ``train --check``, the refusal of a run that cannot
fit its device, and the bounded weight stash (``stash_versions``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import stages_for

from dni_dist import cli
from dni_dist.data import batches
from dni_dist.engines.local import LocalEngine


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dni-dist: error: "), err
    return err


def test_check_prints_an_estimate_per_stage(capsys) -> None:
    assert cli.main(["train", "--check", "--segments", "3", "--runtime", "ray", "--set", "precision=bf16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "memory per stage (estimate):"
    stages = lines[3:]
    assert [line.split(":")[0].strip() for line in stages] == ["stage 0", "stage 1", "stage 2"]
    for part in ("params", "optimizer", "SG", "stash", "pending", "working", "cpu (host memory"):
        assert all(part in line for line in stages), part
    assert "stash 0 B" not in stages[1]  # true targets above stage 0 stash weights


def test_a_run_too_big_for_the_host_is_refused_with_one_line(capsys) -> None:
    args = ["train", "--check", "--set", "model.width=131072", "--set", "model.depth=4"]
    assert cli.main(args) == 2
    err = _one_error_line(capsys)
    assert "stage 0 needs about" in err and "GiB" in err and "host memory" in err


def test_a_stage_too_big_for_its_gpu_is_refused_naming_the_gpu(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=8 << 20))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    base = ["train", "--check", "--runtime", "ray", "--segments", "2"]
    assert cli.main([*base, "--set", "model.width=2048"]) == 2  # about 17 MiB per stage
    err = _one_error_line(capsys)
    assert "stage 0 needs about" in err and "cuda:0 has 8 MiB" in err
    assert cli.main([*base, "--set", "model.width=64"]) == 0  # a small one fits
    assert "cuda:1: 8 MiB" in capsys.readouterr().out


def test_the_estimate_of_a_waiting_step_is_near_what_the_run_measures(capsys) -> None:
    from dni_dist.core.pending import PendingMeter

    stages, data = stages_for("segments=3", "method=sg", "sg.target=true", "data.batch_size=32")
    meter = PendingMeter()
    x, y = next(batches(data.x_train, data.y_train, 32, 0, 0))
    (up,) = stages[0].forward(0, x, y)
    meter.forward(stages[1], 0, up.tensor, up.labels)
    params = sum(p.numel() * 4 for p in stages[1].module.parameters())
    measured = meter.step_bytes - params  # the meter counts the step's stash with it
    plain = meter.step_bytes - meter.stash_bytes  # a step without a weight copy: no graph either
    assert cli.main(["train", "--check", "--segments", "3", "--set", "data.batch_size=32"]) == 0
    line = capsys.readouterr().out.splitlines()[4]
    every, graph = line.split("pending 1 x ")[1].split(",")[0].split(" + graphs ")
    estimate_plain, estimate_graph = _bytes_of(every), _bytes_of(graph)
    assert 0.5 * plain <= estimate_plain <= 2 * plain, (estimate_plain, plain)
    estimate = estimate_plain + estimate_graph
    assert 0.5 * measured <= estimate <= 2 * measured, (estimate, measured)


def _bytes_of(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20}[unit]


def _stash_bytes(stage) -> tuple[int, int]:
    """(pending steps holding a weight copy, the bytes of those copies)."""
    copies = [p.params for p in stage._pending.values() if p.stashed]
    return len(copies), sum(t.nbytes for params in copies for t in params)


@pytest.mark.parametrize("versions", [0, 2])
def test_the_weight_stash_holds_at_most_stash_versions_copies(versions: int) -> None:
    stages, data = stages_for("segments=3", "method=sg", "sg.target=true", f"stash_versions={versions}")
    engine = LocalEngine(stages, delay=8)  # targets 8 steps late: 8 or 9 steps wait at stage 1
    params = sum(p.numel() * p.element_size() for p in stages[1].module.parameters())
    most = 0
    losses = []
    for epoch in range(2):
        for x, y in batches(data.x_train, data.y_train, 64, 0, epoch):
            losses.append(engine.train_step(x, y))
            pending = stages[1].pending_steps
            most = max(most, pending)
            copies, held = _stash_bytes(stages[1])
            assert copies <= versions if versions else copies == pending
            assert held == copies * params
    assert most >= 8
    engine.drain()
    engine.check_numerics()
    values = torch.stack(losses).tolist()
    assert sum(values[-10:]) < 0.5 * sum(values[:10])  # the bounded stash still learns


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("precision=fp16", "precision='fp16'"),
        ("precision=", "precision=''"),
        ("precision=1", "precision='1'"),
        ("stash_versions=-1", "stash_versions=-1"),
        ("stash_versions=1.5", "stash_versions=1.5"),
        ("stash_versions=true", "stash_versions=True"),
        ("stash_versions=100000", "stash_versions=100000"),
    ],
)
def test_bad_values_of_the_new_keys_are_one_line_and_exit_2(setting: str, named: str, capsys) -> None:
    assert cli.main(["train", "--check", "--set", setting]) == 2
    assert named in _one_error_line(capsys)


def _fake_gpus(monkeypatch, count: int, total_memory: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=total_memory))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_stage_0_counts_the_training_set_the_run_would_keep_on_its_gpu(monkeypatch, capsys) -> None:
    from dni_dist.data import device as placement

    _fake_gpus(monkeypatch, 2, 64 << 20)
    base = ["train", "--check", "--runtime", "ray", "--segments", "2", "--set", "model.width=64"]
    assert cli.main(base) == 0
    first, second = capsys.readouterr().out.splitlines()[3:5]
    # digits: 1437 x 64 float32 inputs and int64 labels, well under a quarter of 64 MiB
    assert "data 348 KiB" in first and "data" not in second
    # The same rule as the run's: when the set would stay on the host, it is not counted.
    monkeypatch.setattr(placement, "DEVICE_FRACTION", 0.001)
    assert cli.main(base) == 0
    assert "data" not in capsys.readouterr().out.splitlines()[3]


def test_a_bounded_stash_raises_the_steps_that_fit_the_pending_budget(capsys) -> None:
    def stage_1(*settings: str) -> str:
        args = ["train", "--check", "--runtime", "ray", "--segments", "4", "--set", "dist.pending_memory=1200000"]
        assert cli.main([*args, *(a for s in settings for a in ("--set", s))]) == 0
        return capsys.readouterr().out.splitlines()[4]

    def waiting(line: str) -> int:
        return int(line.split("pending ")[1].split(" x ")[0])

    every, bounded = stage_1(), stage_1("stash_versions=1")
    # 1.2 MB: two steps with a weight copy (515 KiB each); one copy, then 130 KiB a step: the need, 4
    assert (waiting(every), waiting(bounded)) == (2, 4)
    assert "stash 0 B" not in bounded


def test_with_a_reuse_lag_a_waiting_step_counts_its_kept_sg_output(capsys) -> None:
    # digits, K=2, batch 64: the cut's activation is 64 x 256 float32 = 64 KiB; the run's meter
    # and the estimate both add one such output per waiting step.
    from dni_dist.core.pending import PendingMeter

    grows = []
    for lag in (0, 1):
        assert cli.main(["train", "--check", "--segments", "2", "--set", f"sg.reuse_lag={lag}"]) == 0
        line = capsys.readouterr().out.splitlines()[3]
        estimate = _bytes_of(line.split("pending 1 x ")[1].split(",")[0])
        stages, data = stages_for("segments=2", f"sg.reuse_lag={lag}")
        meter = PendingMeter()
        meter.forward(stages[0], 0, *next(batches(data.x_train, data.y_train, 64, 0, 0)))
        grows.append((estimate, meter.step_bytes))
    (estimate_0, measured_0), (estimate_1, measured_1) = grows
    assert measured_1 - measured_0 == 64 * 256 * 4
    assert abs(estimate_1 - estimate_0 - 64 * 256 * 4) < 1024  # the printed sizes are rounded
