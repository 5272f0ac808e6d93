"""benchmarks/gpu_check.py: it says in one line when there is no GPU, and its CPU dry run
takes the same code path at a tiny size (so the script cannot rot between GPU runs)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import run_script_or_fail

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return run_script_or_fail([str(SCRIPT), *args], timeout, "gpu_check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_a_gpu_it_stops_with_one_line_and_exit_2(tmp_path) -> None:
    done = _run("--out", str(tmp_path), timeout=120)
    assert done.returncode == 2
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--cpu-dry-run" in lines[0]
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.slow
def test_the_cpu_dry_run_runs_every_section_and_writes_json_and_markdown(tmp_path) -> None:
    done = _run("--cpu-dry-run", "--out", str(tmp_path), timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    payload = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = payload["sections"]
    assert set(sections) == {"plain", "stage", "sync", "ray-gloo", "ray-grpc", "bf16"}
    assert all(s["ok"] for s in sections.values()), sections
    assert sections["plain"]["samples_per_second"] > 0
    assert sections["ray-gloo"]["samples_per_second"] > 0 and sections["ray-grpc"]["samples_per_second"] > 0
    assert sections["sync"] == {
        "ok": True,
        "skipped": "set_sync_debug_mode needs CUDA",
        "seconds": sections["sync"]["seconds"],
    }
    assert "| plain PyTorch backprop, samples/s |" in (tmp_path / "gpu_check.md").read_text()
