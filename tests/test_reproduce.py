"""`dni-dist reproduce all --quick`: the paper's qualitative claims, pinned at CI size.

One quick run of every experiment for the module (a few minutes on 2 cores); each test
reads the numbers it needs from that run's results.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dni_dist.reproduce import EXPERIMENTS, reproduce

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("reproduce")
    return reproduce("all", out, quick=True), out


def test_every_experiment_writes_its_json_figures_and_a_report_section(quick) -> None:
    results, out = quick
    report = (out / "report.md").read_text()
    for name, result in results.items():
        assert json.loads((out / f"{name}.json").read_text())["finding"] == EXPERIMENTS[name].FINDING
        assert result["figures"] and all((out / f).stat().st_size > 1000 for f in result["figures"])
        assert f"## {name}" in report and all(f"]({f})" in report for f in result["figures"])


def test_mse_linear_and_deep_linear_sg_reach_backprops_loss(quick) -> None:
    rows = [r for r in quick[0]["artificial"]["rows"] if r["loss"] == "mse"]
    assert {r["model"] for r in rows} == {"linear", "deep_linear"}
    for r in rows:
        if r["labels"] == "noisy":
            assert abs(r["loss sg linear"] - r["loss backprop"]) / r["loss backprop"] < 1e-3, r
        else:  # noise-free: the optimum is 0 and full-batch Adam jitters around it (backprop too)
            assert max(r["loss sg linear"], r["loss backprop"]) < 0.01, r


def test_log_loss_separable_linear_sg_falls_short_random_labels_do_not(quick) -> None:
    rows = [r for r in quick[0]["artificial"]["rows"] if r["loss"] == "log"]
    separable_deep = next(r for r in rows if r["labels"] == "separable" and r["model"] == "deep_linear")
    assert separable_deep["gap sg linear"] > separable_deep["gap sg sigmoid"]
    assert separable_deep["gap sg linear"] > 0.01
    for r in rows:
        if r["labels"] == "random":
            assert abs(r["gap sg linear"]) < 0.01, r


def test_top_sgs_implied_loss_tracks_the_true_loss_early_on_mse(quick) -> None:
    results = quick[0]["loss-shape"]["results"]
    for key, value in results.items():
        if "/mse/" in key:
            early = value["series"][0]
            assert early["spearman"][-1] >= 0.8, (key, early)


def test_the_family_as_sg_modules_equals_the_classic_rules_and_the_table(quick) -> None:
    family = quick[0]["family"]
    for gap in family["sg_form_vs_classic_max_abs_diff"].values():
        assert gap < 1e-5
    for method, r in family["results"].items():
        assert r["measured"] == r["table"], method
        assert r["test_accuracy"] > 0.8, method


def test_cdni_trains_with_five_percent_updates(quick) -> None:
    assert quick[0]["stochastic-updates"]["results"]["cDNI"]["0.05"] > 0.5


def test_curves_and_representations_have_every_variant(quick) -> None:
    curves = quick[0]["curves"]["final_test_accuracy"]
    assert len(curves) == 10 and curves["relu/depth 4/SG middle, cond"] >= curves["relu/depth 4/backprop"] - 0.03
    reps = quick[0]["representations"]["results"]
    assert set(reps) == {"backprop", "SG middle", "SG every layer"}
    assert all(len(r["probe_accuracy"]) == 4 and abs(sum(r["weight_norms"]) - 1) < 1e-6 for r in reps.values())
