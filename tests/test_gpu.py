"""CUDA paths; skipped cleanly where there is no GPU (CI never has one)."""

from __future__ import annotations

import pytest
import torch
from conftest import config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_ray_engine_runs_segments_on_the_gpu(tmp_path) -> None:
    import ray

    from dni_dist.runner import train

    ray.init(num_cpus=2, num_gpus=torch.cuda.device_count(), include_dashboard=False)
    try:
        transport = "nccl" if torch.cuda.device_count() >= 2 else "gloo"  # one GPU: shared, gloo on host copies
        summary = train(config("runtime=ray", f"transport={transport}", "segments=2", "epochs=3", f"out={tmp_path}"))
    finally:
        ray.shutdown()
    assert all(s["device"].startswith("cuda") for s in summary["stages"])
    assert summary["test_accuracy"] > 0.9


def test_cuda_tensors_pass_through_the_in_process_transport() -> None:
    from dni_dist.core.messages import Kind, Message
    from dni_dist.transports.base import Stream
    from dni_dist.transports.inproc import InProcessHub, InProcessTransport

    hub = InProcessHub()
    stream = Stream(0, 1, True, (4, 3), (4,))
    sender = InProcessTransport(hub, 0, [], [stream])
    receiver = InProcessTransport(hub, 1, [stream], [])
    for t in (sender, receiver):
        t.start()
    receiver.expect(0, 1)
    x = torch.randn(4, 3, device="cuda")
    sender.send(Message(Kind.ACTIVATION, 0, 0, 1, x, torch.zeros(4, dtype=torch.long, device="cuda")))
    got = receiver.recv(timeout=10)
    torch.testing.assert_close(got.tensor, x)
    for t in (sender, receiver):
        t.close()
