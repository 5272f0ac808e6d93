"""``dni-dist bench``: dispatch and its errors (fast), and the throughput and accuracy
benchmarks at --quick size on an embedded Ray (slow: every method starts its own actors)."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import ray
from helpers import start_local_ray

from dni_dist.bench import BENCHES, run_bench
from dni_dist.bench.accuracy import SIZES, make_spec
from dni_dist.bench.common import BASELINES, DELAYED_METHODS, DNI_METHODS, METHODS
from dni_dist.cli import _segments, main
from dni_dist.errors import ConfigError


@pytest.fixture(scope="module")
def ray_session():
    start_local_ray()
    yield
    ray.shutdown()


def test_unknown_bench_name_exits_2_with_one_line(capsys, tmp_path) -> None:
    assert main(["bench", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'nope' is unknown" in err and "throughput" in err


def test_missing_bench_module_is_not_available(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(BENCHES, "ghost", "ghost")
    with pytest.raises(ConfigError, match="not available"):
        run_bench("ghost", tmp_path, True, [2])


def test_flag_a_bench_does_not_take_is_refused(monkeypatch, tmp_path) -> None:
    calls = []
    fake = types.ModuleType("dni_dist.bench.fake")
    fake.run = lambda out, quick, segments: calls.append((out, quick, segments)) or {}
    monkeypatch.setitem(sys.modules, "dni_dist.bench.fake", fake)
    monkeypatch.setitem(BENCHES, "fake", "fake")
    with pytest.raises(ConfigError, match="does not take --width"):
        run_bench("fake", tmp_path, True, [2], width=8)
    run_bench("fake", tmp_path, True, [2, 3], width=None)  # unset options are not passed on
    assert calls == [(tmp_path, True, [2, 3])]


def test_segments_accepts_repeats_and_comma_lists() -> None:
    assert _segments(["2,3", "4"]) == [2, 3, 4]
    assert _segments([]) == []  # none given: each benchmark picks its own default
    with pytest.raises(ConfigError, match="'x'"):
        _segments(["2,x"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--segments", "1"], "K >= 2"),
        (["--segments", "9"], "blocks"),
        (["--methods", "sg,bogus"], "bogus"),
        (["--segments", "3", "--batch-size", "32"], "divisible by K=3"),
        (["--segments", "4", "--micro-batches", "2", "--methods", "1f1b"], "1f1b needs"),
        (["--target-accuracy", "0.9"], "does not take --target-accuracy"),
        (["--windows", "1"], "--windows 1"),
        (["--set", "model.kind=transformer"], "use a language-modelling set (data.name=text)"),
    ],
)
def test_bad_bench_options_exit_2_before_starting_anything(capsys, tmp_path, args, message) -> None:
    assert main(["bench", "throughput", "--quick", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "throughput.json").exists()


def test_accuracy_target_and_data_follow_the_dataset(capsys, tmp_path) -> None:
    spec, target, epochs = make_spec(False, {"settings": ["data.name=mnist1d"]})
    assert spec.data == ("data.name=mnist1d",) and (spec.width, spec.batch_size, target) == (256, 64, 0.84)
    spec, target, epochs = make_spec(True, {"dataset": "mnist1d"})
    assert spec.data == ("data.name=mnist1d",) and (target, epochs) == (SIZES["mnist1d"][0][3], 3)
    # --set wins over --dataset, as it wins over train's flags; an explicit target wins over both.
    spec, target, _ = make_spec(True, {"dataset": "mnist1d", "settings": ["data.name=digits"], "target_accuracy": 0.5})
    assert spec.data == ("data.name=digits",) and target == 0.5
    assert main(["bench", "accuracy", "--quick", "--out", str(tmp_path), "--dataset", "artificial"]) == 2
    assert "data.name='artificial' has no default target" in capsys.readouterr().err
    assert main(["bench", "throughput", "--quick", "--out", str(tmp_path), "--dataset", "mnist1d"]) == 2
    assert "does not take --dataset" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_throughput_quick_records_every_method_and_finite_ratios(ray_session, tmp_path) -> None:
    payload = run_bench("throughput", tmp_path, True, [2], cpus_per_stage=0.5)
    on_disk = json.loads((tmp_path / "throughput.json").read_text())
    assert on_disk == payload
    assert {"setup", "results", "ratios"} <= set(on_disk)
    assert {"model", "batch_size", "machine"} <= set(on_disk["setup"])
    assert {"cpu_count", "torch", "device", "date", "command"} <= set(on_disk["setup"]["machine"])
    assert sorted(r["method"] for r in on_disk["results"]) == sorted(METHODS)
    for r in on_disk["results"]:
        assert r["segments"] == 2 and r["samples_per_second"] > 0 and len(r["windows"]) == 2
    expected = {f"{m} / {b} (K=2)" for m in DNI_METHODS for b in BASELINES + DELAYED_METHODS}
    expected |= {f"{m} / best backprop (K=2)" for m in DNI_METHODS}
    assert set(on_disk["ratios"]) == expected
    assert all(math.isfinite(v) and v > 0 for v in on_disk["ratios"].values())
    assert (tmp_path / "throughput.png").stat().st_size > 0
    assert "| 2 | gpipe |" in (tmp_path / "throughput.md").read_text()
    for r in on_disk["results"]:  # engine runs: never faster than their slowest stage's compute
        if "busy_fraction" in r:
            assert len(r["stage_compute_seconds"]) == 2
            assert r["samples_per_second"] <= r["compute_bound_samples_per_second"] * 1.05
    assert "slowest stage's bound" in (tmp_path / "throughput.md").read_text()


@pytest.mark.slow
def test_accuracy_quick_baselines_train_the_same_model(ray_session, tmp_path) -> None:
    methods = "backprop-1dev,backprop-naive-mp,gpipe,ddp,sg-true"
    payload = run_bench("accuracy", tmp_path, True, [2], methods=methods, cpus_per_stage=0.5, target_accuracy=1.0)
    results = {r["method"]: r for r in json.loads((tmp_path / "accuracy.json").read_text())["results"]}
    assert list(results) == methods.split(",")
    # A target of 100% is not reached in 3 epochs: every method runs them all, none has a time.
    assert all(r["epochs"] == 3 and r["time_to_target"] is None for r in results.values())
    assert payload["ratios"] == {"sg-true / best backprop (K=2)": None}
    # Backprop is backprop however it is distributed: the same initial model, batches and
    # Adam give the same test accuracy after each epoch (up to float rounding).
    reference = [h["test_accuracy"] for h in results["backprop-1dev"]["history"]]
    for m in ("backprop-naive-mp", "gpipe", "ddp"):
        other = [h["test_accuracy"] for h in results[m]["history"]]
        assert all(abs(a - b) <= 0.005 for a, b in zip(reference, other, strict=True)), (m, reference, other)
    assert reference[-1] > 0.5  # and it learns


@pytest.mark.slow
def test_accuracy_quick_stops_at_the_target(ray_session, tmp_path) -> None:
    payload = run_bench("accuracy", tmp_path, True, [2], methods="backprop-1dev", target_accuracy=0.3)
    (r,) = payload["results"]
    assert r["time_to_target"] is not None and r["time_to_target"] == r["train_seconds"]
    assert r["history"][-1]["test_accuracy"] >= 0.3 and r["epochs"] == len(r["history"])
    assert all(h["test_accuracy"] < 0.3 for h in r["history"][:-1])
