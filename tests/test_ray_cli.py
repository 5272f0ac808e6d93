"""The CLI on Ray as users run it: `ray job submit` to a cluster, and Ctrl-C.

Both start and stop Ray processes of their own, so they live apart from the module that
keeps one Ray session for its tests.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dni_dist.transports.torch_dist import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # so `dni-dist` resolves
    env.pop("RAY_ADDRESS", None)
    return env


def _stage_workers() -> list[str]:
    found = subprocess.run(["pgrep", "-f", "StageWorker"], capture_output=True, text=True)
    return found.stdout.split()


def test_ray_job_submit_runs_the_cli_on_a_cluster(tmp_path) -> None:
    env = _env()
    # Ray >= 2.59 authenticates its dashboard and job API with a token: the cluster and the
    # submitting client share one, generated here and never written to ~/.ray.
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    ray = str(Path(sys.executable).parent / "ray")
    dashboard = free_port()
    head = [
        ray,
        "start",
        "--head",
        f"--port={free_port()}",
        f"--dashboard-port={dashboard}",
        "--num-cpus=2",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        "--disable-usage-stats",
    ]
    subprocess.run(head, env=env, check=True, capture_output=True, timeout=180)
    try:
        out = tmp_path / "job"
        submit = [
            ray,
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{dashboard}",
            "--working-dir",
            str(REPO),
            "--",
            "dni-dist",
            "train",
            "--runtime",
            "ray",
            "--transport",
            "gloo",
            "--segments",
            "2",
            "--epochs",
            "2",
            "--out",
            str(out),
            "--set",
            "dist.cpus_per_stage=0.5",
        ]
        deadline = time.monotonic() + 120
        while True:  # the job agent comes up after the dashboard; until then submits are refused
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stderr + job.stdout or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["runtime"] == "ray" and summary["epochs"] == 2 and summary["test_accuracy"] > 0.5
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_the_laptop_command_runs_over_shared_memory_and_leaves_nothing_behind(tmp_path) -> None:
    # README's laptop command without --transport: the default (auto) takes shared memory
    # with an embedded Ray, and the rings' files are gone once both ends have them.
    shm = Path("/dev/shm")
    before = set(shm.glob("dni-*")) if shm.is_dir() else set()
    cmd = [sys.executable, "-m", "dni_dist", "train", "--runtime", "ray", "--segments", "2", "--epochs", "3"]
    done = subprocess.run(
        [*cmd, "--out", str(tmp_path), "--quiet"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["transport"] == "shm" and summary["test_accuracy"] > 0.8
    assert all(s["dropped_targets"] == 0 for s in summary["stages"])
    if shm.is_dir():
        assert set(shm.glob("dni-*")) == before


def test_ctrl_c_stops_every_actor(tmp_path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "dni_dist",
        "train",
        "--runtime",
        "ray",
        "--epochs",
        "500",
        "--out",
        str(tmp_path),
        "--set",
        "dist.num_cpus=2",
    ]
    # A shell's background job (`cmd &`, nohup) starts with SIGINT ignored, the child would
    # inherit that and never see the Ctrl-C: give it the default a terminal's command has.
    proc = subprocess.Popen(
        cmd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (metrics.exists() and '"event": "epoch"' in metrics.read_text()):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.5)
    assert _stage_workers(), "the run should have stage actors while it trains"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    deadline = time.monotonic() + 30
    while _stage_workers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _stage_workers()
