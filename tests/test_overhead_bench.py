"""``dni-dist bench overhead``: what it calls overhead (fast), and a run end to end (slow)."""

from __future__ import annotations

import pytest

from dni_dist.bench import run_bench
from dni_dist.bench.overhead import _summarise
from dni_dist.cli import main


def test_the_local_engine_is_charged_over_the_sum_of_its_stages_and_ray_over_the_slowest() -> None:
    computes = [[0.002, 0.001]]  # seconds per step, stage 0 and stage 1
    local = _summarise("local (1 thread)", [0.004], computes, None, steps=10, batch=64)
    ray = _summarise("ray", [0.004], computes, [[0.0035, 0.0038]], steps=10, batch=64)
    assert local["overhead_ms_per_step"] == pytest.approx(1.0)  # 4 ms - (2 + 1) ms: run one after the other
    assert ray["overhead_ms_per_step"] == pytest.approx(2.0)  # 4 ms - 2 ms: a pipeline takes its slowest stage
    assert [s["busy_fraction"] for s in ray["stages"]] == pytest.approx([2 / 3.5, 1 / 3.8], abs=1e-3)
    assert ray["samples_per_second"] == pytest.approx(64 / 0.004)


def test_more_than_one_k_is_refused_in_one_line(capsys, tmp_path) -> None:
    assert main(["bench", "overhead", "--segments", "2,3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "takes one K" in err and err.strip().count("\n") == 0


@pytest.mark.slow
def test_overhead_runs_both_engines_and_writes_its_table(tmp_path) -> None:
    payload = run_bench("overhead", tmp_path, True, [2], windows=2, cpus_per_stage=0.5)
    names = [e["engine"] for e in payload["engines"]]
    assert names == ["local (1 thread)", "ray"]
    ray = payload["engines"][1]
    assert len(ray["stages"]) == 2 and all(0 < s["busy_fraction"] <= 1 for s in ray["stages"])
    assert payload["ray_over_local_samples_per_second"] > 0
    assert "Ray / best local" in (tmp_path / "overhead.md").read_text()
