"""The scale model: analytic properties of the simulator, and a quick run's outputs."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from dni_dist.bench import scale
from dni_dist.bench.scale_sim import (
    Link,
    Profile,
    StageCosts,
    ddp_samples_per_second,
    dni_in_flight,
    ring_allreduce_s,
    simulate,
    steady_samples_per_second,
)
from dni_dist.core.pending import auto_in_flight

# One segment of a model of K equal segments: forward 1 s, backward 2 s per batch.
SEG = StageCosts(forward_s=1.0, backward_s=2.0, sg_s=1.2, sg_train_s=1.1, activation_bytes=1000, grad_bytes=1000)
BATCH = 10


def one_device(k: int) -> float:
    """samples/s of one device holding all k segments."""
    return BATCH / (k * (SEG.forward_s + SEG.backward_s))


@pytest.mark.parametrize("k", [2, 4, 8])
def test_naive_model_parallel_is_one_device_without_comm(k):
    rate = simulate("backprop", [SEG] * k, BATCH, 20).samples_per_second
    assert rate == pytest.approx(one_device(k), rel=1e-9)


def test_naive_model_parallel_pays_every_hop_twice():
    link = Link(latency_s=0.5, bandwidth_Bps=1000.0)  # 1.5 s per message
    rate = simulate("backprop", [SEG] * 4, BATCH, 10, Profile(intra=link, inter=link)).samples_per_second
    assert BATCH / rate == pytest.approx(4 * 3.0 + 2 * 3 * 1.5)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_dni_with_unlimited_in_flight_is_k_times_less_sg_overhead(k):
    rate = steady_samples_per_second("dni", [SEG] * k, BATCH, 50, max_in_flight=10_000)
    # The busiest stage runs forward, SG update and SG training per batch (the top only F + B).
    busiest = SEG.forward_s + SEG.sg_s + SEG.sg_train_s
    assert rate == pytest.approx(BATCH / busiest, rel=1e-6)
    assert rate == pytest.approx(k * one_device(k) * (SEG.forward_s + SEG.backward_s) / busiest, rel=1e-6)


@pytest.mark.parametrize(("k", "m"), [(2, 4), (4, 4), (4, 16), (8, 32)])
def test_gpipe_bubble_is_k_minus_1_over_m_plus_k_minus_1(k, m):
    result = simulate("gpipe", [SEG] * k, BATCH, 5 * m, micro_batches=m)
    busy = result.steps * (SEG.forward_s + SEG.backward_s)  # each stage's compute
    bubble = 1 - busy / result.makespan_s
    assert bubble == pytest.approx((k - 1) / (m + k - 1), abs=1e-9)


@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("mode", ["true", "bootstrap", "lambda"])
def test_the_default_in_flight_limit_runs_at_full_speed(k, mode):
    def rate(cap: int) -> float:
        return steady_samples_per_second("dni", [SEG] * k, BATCH, 60, max_in_flight=cap, target_mode=mode)

    assert dni_in_flight([SEG] * k, mode) == (auto_in_flight(k, mode), "pipeline")
    assert rate(0) == pytest.approx(rate(10_000), rel=1e-6)  # 0: the runtime's default


def test_bootstrap_targets_need_one_hop_not_the_whole_pipeline():
    def rate(mode: str, cap: int) -> float:
        return steady_samples_per_second("dni", [SEG] * 8, BATCH, 60, max_in_flight=cap, target_mode=mode)

    assert rate("bootstrap", 2) > 2 * rate("true", 2)  # the round trip is stage 1's, not the top's
    assert rate("bootstrap", 2) == pytest.approx(rate("bootstrap", 10_000), rel=1e-6)
    # lambda waits for the true part: with free links and equal costs it paces like true
    assert rate("lambda", 2) == pytest.approx(rate("true", 2), rel=1e-6)


def test_the_memory_budget_bounds_the_default_limit():
    costs = [dataclasses.replace(SEG, pending_bytes=1000)] * 8
    assert dni_in_flight(costs, "true", pending_memory=2500) == (2, "memory")
    assert dni_in_flight(costs, "true", max_in_flight=7, pending_memory=2500) == (7, "explicit")
    bounded = steady_samples_per_second("dni", costs, BATCH, 60, pending_memory=2500)
    assert bounded == pytest.approx(steady_samples_per_second("dni", costs, BATCH, 60, max_in_flight=2))


def test_a_stage_above_0_holds_its_input_while_its_budget_is_full():
    heavy = dataclasses.replace(SEG, pending_bytes=1000)  # stage 1 keeps a graph, the others little
    light = dataclasses.replace(SEG, pending_bytes=10)
    costs = [light, heavy, light, light]
    free = steady_samples_per_second("dni", costs, BATCH, 60)
    assert steady_samples_per_second("dni", costs, BATCH, 60, pending_memory=10**6) == pytest.approx(free)
    held = steady_samples_per_second("dni", costs, BATCH, 60, pending_memory=1000)  # stage 1: one step
    assert dni_in_flight(costs, "true", pending_memory=1000) == (4, "pipeline")  # stage 0 is not bound
    assert held < 0.8 * free


def test_cluster_costs_per_target_mode():
    model = scale.ClusterModel()
    true, boot, lam = (model.costs(4, m) for m in ("true", "bootstrap", "lambda"))
    assert boot[1].sg_train_s < true[1].sg_train_s == lam[1].sg_train_s  # bootstrap passes nothing down
    assert true[1].sg_s < boot[1].sg_s == lam[1].sg_s  # bootstrap and lambda compute dX in the update
    assert boot[1].dni_forward < true[1].dni_forward  # no weight stashing
    # stage 0 keeps x and h; stage 1 with true targets also its graph and the stashed weights
    assert true[0].pending_bytes == boot[1].pending_bytes == 2 * true[0].activation_bytes < true[1].pending_bytes


def test_1f1b_steady_state_has_no_bubble():
    assert steady_samples_per_second("1f1b", [SEG] * 4, BATCH, 40) == pytest.approx(4 * one_device(4), rel=1e-6)


def test_ddp_with_free_links_is_k_times_and_ring_formula():
    costs = [dataclass_with_params(SEG, 4000)] * 4
    free = Profile()
    assert ddp_samples_per_second(costs, 8, BATCH, free) == pytest.approx(8 * one_device(4))
    link = Link(latency_s=0.01, bandwidth_Bps=100.0)
    assert ring_allreduce_s(16000, 8, link) == pytest.approx(2 * 7 / 8 * 160 + 14 * 0.01)
    slow = Profile(intra=link, inter=link)
    exposed = ddp_samples_per_second(costs, 8, BATCH, slow, overlap=False)
    assert BATCH * 8 / exposed == pytest.approx(12.0 + ring_allreduce_s(16000, 8, link))
    hidden = ddp_samples_per_second(costs, 8, BATCH, slow, overlap=True)
    assert BATCH * 8 / hidden == pytest.approx(4.0 + ring_allreduce_s(16000, 8, link))  # longer than backward


def dataclass_with_params(costs: StageCosts, param_bytes: int) -> StageCosts:
    return dataclasses.replace(costs, param_bytes=param_bytes)


def test_latency_hurts_dni_only_when_in_flight_cannot_cover_the_round_trip():
    stages = [SEG] * 4
    slow = Link(latency_s=2.0)  # a round trip of 6 hops: 12 s of latency
    profile = Profile(intra=slow, inter=slow)

    def rate(cap: int, prof: Profile | None = None) -> float:
        return steady_samples_per_second("dni", stages, BATCH, 60, max_in_flight=cap, profile=prof)

    assert rate(64, profile) == pytest.approx(rate(64), rel=1e-6)  # enough in flight: latency hidden
    assert rate(2, profile) < 0.7 * rate(2)  # two in flight: the round trip sets the pace


def test_one_stage_is_the_same_for_every_simulated_method():
    rates = {m: simulate(m, [SEG], BATCH, 8).samples_per_second for m in ("backprop", "dni", "gpipe", "1f1b")}
    assert all(r == pytest.approx(BATCH / 3.0) for r in rates.values())


def test_device_speed_scales_compute():
    fast = Profile(speed=4.0)
    assert simulate("backprop", [SEG] * 2, BATCH, 5, fast).samples_per_second == pytest.approx(4 * one_device(2))


def test_cluster_model_costs_are_self_consistent():
    model = scale.ClusterModel()
    one, eight = model.costs(1)[0], model.costs(8)
    assert sum(c.forward_s for c in eight) == pytest.approx(one.forward_s)
    assert eight[0].sg_train_s < eight[1].sg_train_s  # stage 0 passes no gradient down
    assert eight[0].activation_bytes == model.tokens_per_batch * model.d_model * model.bytes_per_value


def test_quick_run_writes_well_formed_outputs(tmp_path, monkeypatch):
    # A small model keeps the in-process cost measurement to a second; the run is the same.
    monkeypatch.setattr(scale, "VALIDATION_MODEL", [*scale.VALIDATION_MODEL, "model.width=64", "data.samples=2000"])
    result = scale.run(tmp_path, quick=True, segments=[8, 2])
    data = json.loads((tmp_path / "scale.json").read_text())
    assert data["segments"] == [2, 8]
    assert [(r["segments"], r["method"]) for r in data["validation"]] == [(1, "backprop"), (2, "backprop"), (2, "sg")]
    assert all(r["predicted"] > 0 and r["measured"] is None for r in data["validation"])
    for method in scale.METHOD_LABELS:
        for k in ("2", "8"):
            speedup = data["predictions"][method][k]["speedup"]
            assert math.isfinite(speedup) and 0 < speedup <= int(k) * 1.01
    assert data["predictions"]["ddp"]["8"]["speedup"] == pytest.approx(8, rel=0.05)
    assert isinstance(data["checks"]["dni_k8_at_least_7.2x"], bool)
    assert data["checks"]["dni_default_k8_at_least_7.2x"] is True  # the target, default config
    assert isinstance(data["checks"]["dni_default_k8_ahead_of_1f1b"], bool)
    assert data["predictions"]["dni"]["8"]["speedup"] > 2 * data["predictions"]["dni_inflight2"]["8"]["speedup"]
    limits = data["dni_default_in_flight"]["8"]
    assert [limits[m]["in_flight_limit"] for m in ("true", "bootstrap", "lambda")] == [8, 2, 8]
    assert data["validation_inputs"]["link_measurement"] == {"assumed": True}
    assert "| K | method | predicted |" in (tmp_path / "scale.md").read_text()
    assert (tmp_path / "scale.png").stat().st_size > 1000
    assert result["predictions"] == data["predictions"]


def test_costs_rescaled_to_a_run_reproduce_its_compute_per_step():
    stages = [{"steps": 10, "compute_seconds": 66.0}, {"steps": 10, "compute_seconds": 30.0}]
    scaled = scale.rescale_to_run([SEG, SEG], stages, unlocked=True)
    assert scaled[0].dni_forward + scaled[0].sg_s + scaled[0].sg_train_s == pytest.approx(6.6)
    assert scaled[0].sg_s / scaled[0].sg_train_s == pytest.approx(SEG.sg_s / SEG.sg_train_s)
    assert scaled[1].forward_s + scaled[1].backward_s == pytest.approx(3.0)  # the top: forward + backward


def test_bad_segments_are_a_config_error(tmp_path):
    from dni_dist.errors import ConfigError

    with pytest.raises(ConfigError, match="segments"):
        scale.run(tmp_path, quick=True, segments=[0])
