"""Shared test helpers: build stages from overrides, run lockstep steps."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dni_dist.builder import build_stages, load_data
from dni_dist.config import load_config
from dni_dist.core.stage import Stage
from dni_dist.data import Dataset, batches
from dni_dist.engines.local import LocalEngine


def stages_for(*overrides: str) -> tuple[list[Stage], Dataset]:
    cfg = load_config(overrides=list(overrides))
    data = load_data(cfg)
    return build_stages(cfg, data.input_shape, data.task), data


def first_batch(data: Dataset, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    return next(batches(data.x_train, data.y_train, size, seed=0, epoch=0))


def train_steps(engine: LocalEngine, data: Dataset, steps: int, size: int = 32) -> None:
    for i, (x, y) in enumerate(batches(data.x_train, data.y_train, size, seed=0, epoch=0)):
        if i == steps:
            break
        engine.train_step(x, y)


def local_params(overrides: tuple[str, ...], epochs: int, batch_size: int = 64) -> torch.Tensor:
    """Every parameter after ``epochs`` of the local engine (the reference), flattened."""
    stages, data = stages_for(*overrides)
    engine = LocalEngine(stages)
    for epoch in range(epochs):
        for x, y in batches(data.x_train, data.y_train, batch_size, 0, epoch):
            engine.train_step(x, y)
    return flat_params(stages)


def flat_params(stages: list[Stage]) -> torch.Tensor:
    tensors = [p.detach().flatten() for s in stages for p in s.module.parameters()]
    tensors += [p.detach().flatten() for s in stages if s.boundary is not None for p in s.boundary.parameters()]
    return torch.cat(tensors)


def start_local_ray(cpus: int = 2) -> None:
    """One local Ray for a test module. On a loaded 2-core machine Ray's node startup can
    time out now and then ("The current node timed out during startup"); a second attempt
    after a clean shutdown is what a user would do, so the tests do it too."""
    import ray

    for attempt in range(2):
        try:
            # "local": never join a cluster some `ray start` left on the machine
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception:
            ray.shutdown()
            if attempt:
                raise


def run_script_or_fail(args: list[str], timeout: float, what: str) -> subprocess.CompletedProcess[str]:
    """Run a Python script with the repository on its path, in its own session, so that on
    a timeout every process it started is killed and the test fails (a hang never blocks CI)."""
    root = str(Path(__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{what} did not finish in {timeout:.0f} s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_for(condition: Callable[[], bool], seconds: float = 20.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``seconds`` pass (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


_module_numbers = itertools.count()


def write_module(directory: Path, monkeypatch: pytest.MonkeyPatch, prefix: str, source: str) -> str:
    """A fresh module holding ``source`` (dedented), importable for this test; its name.
    Each call gets a new name: Python caches a module by name for the whole session."""
    name = f"{prefix}_{next(_module_numbers)}"
    (directory / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(directory))
    return name
