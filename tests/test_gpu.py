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

    ray.init(address="local", num_cpus=2, num_gpus=torch.cuda.device_count(), include_dashboard=False)
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


def test_the_training_set_goes_to_the_gpu_when_it_fits_else_pinned_copies(monkeypatch) -> None:
    from dni_dist.data import device as placement
    from dni_dist.data.device import TrainingSet

    x, y = torch.randn(300, 8), torch.arange(300) % 10
    on_gpu = TrainingSet(x, y, torch.device("cuda:0"))
    assert on_gpu.resident and on_gpu.x.is_cuda
    monkeypatch.setattr(placement, "DEVICE_FRACTION", 0.0)
    pinned = TrainingSet(x, y, torch.device("cuda:0"))
    assert not pinned.resident and not pinned.x.is_cuda
    for (a, b), (c, d) in zip(on_gpu.batches(64, 0, 0), pinned.batches(64, 0, 0), strict=True):
        assert a.is_cuda and c.is_cuda and torch.equal(a, c) and torch.equal(b, d)


def test_host_placement_prefetches_pinned_batches_on_a_side_stream_without_host_syncs() -> None:
    from dni_dist.data import batches
    from dni_dist.data.device import TrainingSet

    x, y = torch.randn(1000, 32), torch.arange(1000) % 10
    resident = TrainingSet(x, y, torch.device("cuda:0"), "device")
    host = TrainingSet(x, y, torch.device("cuda:0"), "host")
    assert resident.x.is_cuda and not host.resident and not host.x.is_cuda
    expected = list(batches(x, y, 64, 1, 2))
    torch.cuda.synchronize()
    got = []
    torch.cuda.set_sync_debug_mode("error")  # a host wait in the copy path raises here
    try:
        for (a, b), (c, d) in zip(resident.batches(64, 1, 2), host.batches(64, 1, 2), strict=True):
            assert c.is_cuda and d.is_cuda
            got.append(((c * 2).sum() + d.sum(), (a * 2).sum() + b.sum()))  # compute reads the copy
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(got) == len(expected)
    for prefetched, on_device in got:
        assert torch.equal(prefetched, on_device)
    for (a, b), (c, d) in zip(expected, host.batches(64, 1, 2), strict=True):
        assert torch.equal(a, c.cpu()) and torch.equal(b, d.cpu())


def test_a_bf16_stage_step_on_the_gpu_reads_nothing_back() -> None:
    from helpers import first_batch, stages_for

    stages, data = stages_for("segments=2", "precision=bf16")
    for stage in stages:
        stage.module.cuda()
        if stage.boundary is not None:
            stage.boundary.cuda()
    x, y = first_batch(data)
    x, y = x.cuda(), y.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            (up,) = stages[0].forward(step, x, y)
            stages[0].update(step)
            (grad,) = stages[1].forward(step, up.tensor, up.labels)
            stages[0].on_message(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stages[0].check_numerics()
    assert stages[0].stats.summary()["updates"] == 3
