"""The driver's memory on a Ray run that checkpoints: does it hold the stages' tensors?

Digits default (method sg), K=2 on Ray, ``checkpoint.every=5`` into ``checkpoint.dir``, a
wider model (``model.width``, default 1024) so that a stage's state is many MB. Prints the
driver's resident memory (``/proc/self/status``: VmRSS before the run, VmHWM = its peak,
VmRSS after) and the size of one checkpoint on disk. To compare two trees, run it with
PYTHONPATH pointing at each checkout in turn, e.g.
``PYTHONPATH=/path/to/old python benchmarks/driver_memory.py old``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import ray
import torch

from dni_dist.config import load_config
from dni_dist.operations import checkpoint
from dni_dist.runner import train


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def main(label: str, width: int) -> None:
    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = Path(f"runs/driver-memory-{label}")
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        "epochs=2",
        "segments=2",
        "runtime=ray",
        "transport=gloo",
        "dist.cpus_per_stage=1",
        f"model.width={width}",
        "progress=off",
        f"out={out}",
        f"checkpoint.dir={out / 'ck'}",
        "checkpoint.every=5",
    ]
    cfg = load_config(overrides=overrides)
    before = _status_mib("VmRSS")
    summary = train(cfg, verbose=False)
    peak, after = _status_mib("VmHWM"), _status_mib("VmRSS")
    ray.shutdown()
    newest = checkpoint.latest(out / "ck")
    assert newest is not None
    on_disk = sum(f.stat().st_size for f in newest.iterdir()) / 2**20
    print(
        f"{label}: width={width} checkpoints={summary['checkpoints']} checkpoint={on_disk:.1f} MiB; "
        f"driver VmRSS before={before:.0f} MiB, peak (VmHWM)={peak:.0f} MiB, after={after:.0f} MiB, "
        f"peak-before={peak - before:.0f} MiB"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "run", int(sys.argv[2]) if len(sys.argv) > 2 else 1024)
