"""precision=bf16: autocast forward passes, float32 master weights, bf16 on the wire."""

from __future__ import annotations

import pytest
import torch
from conftest import config
from helpers import first_batch, stages_for

from dni_dist.core.messages import Kind, Message, Stream
from dni_dist.transports.validate import SentSteps, StreamGuard, WireViolation, stream_bytes
from dni_dist.wire.codec import Assembler, WireError, check_handshake, handshake, message_frames


def test_bf16_stages_keep_float32_weights_and_send_bf16() -> None:
    stages, data = stages_for("precision=bf16", "segments=3", "method=sg")
    x, y = first_batch(data)
    (up,) = stages[0].forward(0, x, y)
    assert up.kind is Kind.ACTIVATION and up.tensor.dtype == torch.bfloat16
    assert stages[0].update(0) == []  # stage 0 sends nothing down
    (up2,) = stages[1].forward(0, up.tensor, up.labels)
    assert up2.tensor.dtype == torch.bfloat16
    (grad,) = stages[2].forward(0, up2.tensor, up2.labels)
    assert grad.kind is Kind.GRAD and grad.tensor.dtype == torch.bfloat16
    (down,) = stages[1].on_message(grad)
    assert down.tensor.dtype == torch.bfloat16
    stages[0].on_message(down)
    for stage in stages:
        assert all(p.dtype == torch.float32 for p in stage.module.parameters())
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in stage.module.parameters())
    assert stages[0].stats.summary()["sg_updates"] == 1 and stages[0].stats.summary()["sg_loss"] is not None


def test_bf16_trains_two_segments_on_the_local_engine(tmp_path) -> None:
    from dni_dist.runner import train

    summary = train(config("precision=bf16", "segments=2", "epochs=4", f"out={tmp_path}", "progress=off"))
    assert summary["test_accuracy"] > 0.9  # fp32 reaches about 0.98 in these 4 epochs


def test_a_bf16_stream_round_trips_through_the_wire_format_and_refuses_float32() -> None:
    stream = Stream(0, 1, True, (4, 3), (4,), torch.long, torch.bfloat16)
    x = torch.randn(4, 3).to(torch.bfloat16)
    labels = torch.arange(4)
    assembler = Assembler(stream)
    (frame,) = message_frames(Message(Kind.ACTIVATION, 0, 0, 1, x, labels))
    msg = assembler.feed(frame)
    assert msg.tensor.dtype == torch.bfloat16 and torch.equal(msg.tensor, x) and torch.equal(msg.labels, labels)
    (fp32_frame,) = message_frames(Message(Kind.ACTIVATION, 1, 0, 1, x.float(), labels))
    with pytest.raises(WireError, match="is not bfloat16"):
        Assembler(stream).feed(fp32_frame)
    # The handshake names the dtype: a float32 peer cannot open a bf16 stream.
    fp32_stream = Stream(0, 1, True, (4, 3), (4,))
    with pytest.raises(WireError, match="differ"):
        check_handshake(handshake(fp32_stream, "run"), {0: stream}, rank=1, run_id="run")
    assert check_handshake(handshake(stream, "run"), {0: stream}, rank=1, run_id="run") == stream


def test_the_stream_guard_checks_the_streams_dtype_and_sizes_it() -> None:
    stream = Stream(1, 0, False, (8, 5), dtype=torch.bfloat16)
    assert stream_bytes(stream) == 8 * 5 * 2 + 16
    sent = SentSteps()
    sent.record(Message(Kind.ACTIVATION, 0, 0, 1, torch.zeros(1), torch.zeros(1)))
    guard = StreamGuard(stream, sent)
    guard.check(Message(Kind.GRAD, 0, 1, 0, torch.zeros(8, 5, dtype=torch.bfloat16)))
    with pytest.raises(WireViolation, match=r"is not bfloat16\(8, 5\)"):
        guard.check(Message(Kind.BOOTSTRAP, 0, 1, 0, torch.zeros(8, 5)))


@pytest.mark.parametrize("method", ["backprop", "dfa"])
def test_bf16_fixed_boundaries_pass_a_small_gradient_on_intact(method: str) -> None:
    """Backprop's target is h - dL/dh: in bf16 a small dL/dh would vanish against |h|."""
    from dni_dist.core.methods import build_boundary
    from dni_dist.core.precision import autocast

    torch.manual_seed(0)
    boundary = build_boundary(method, None, (64,), 10, 0)
    h = (torch.randn(8, 64) * 4).to(torch.bfloat16)
    received = torch.randn(8, 64 if method == "backprop" else 10) * 1e-3
    with autocast("bf16", h.device):
        got = boundary.signal(h, torch.zeros(8, 10), received.to(torch.bfloat16)).float()
    want = received if method == "backprop" else received @ boundary.projection.T
    assert (got - want).norm() / want.norm() < 0.02
