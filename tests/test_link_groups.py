"""The per-link torch.distributed transport: one group per directed link, made in one order
on every rank; K=4 stages in 4 processes over gloo, every method, under a hard timeout."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import run_script_or_fail

from dni_dist.core.messages import Stream
from dni_dist.engines.wiring import all_streams
from dni_dist.transports.torch_dist import TorchDistTransport, link_order

HERE = Path(__file__).parent
HARD_TIMEOUT_S = 240  # a hang fails the test here, whatever happens inside


def _run_ranks(out: Path, methods: list[str]) -> subprocess.CompletedProcess[str]:
    """The 4 ranks in their own session, so a timeout can kill them all (no orphan ranks)."""
    return run_script_or_fail([str(HERE / "link_ranks.py"), str(out), *methods], HARD_TIMEOUT_S, "the ranks (a hang)")


def test_links_are_made_in_one_order_whatever_order_the_streams_come_in() -> None:
    streams = all_streams(4, [(8,)] * 3, 16, _task(), direct_error=True)
    order = link_order(streams)
    assert order == link_order(list(reversed(streams)))
    assert order == [(0, 1), (1, 2), (2, 3), (3, 0), (3, 1), (3, 2)]  # up k -> k+1, errors top -> k


def test_a_stream_without_its_group_is_refused() -> None:
    stream = Stream(0, 1, True, (4,), (4,))
    with pytest.raises(ValueError, match="0->1"):
        TorchDistTransport(0, [], [stream], {}, torch.device("cpu"), torch.device("cpu"))


@pytest.mark.slow
def test_k4_every_method_runs_over_per_link_gloo_groups_without_hanging(tmp_path) -> None:
    out = tmp_path / "ranks.json"
    methods = ["backprop", "sg", "sg-prop", "fa", "dfa", "kickback", "ddg"]
    done = _run_ranks(out, methods)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = json.loads(out.read_text())
    from link_ranks import STEPS

    for method in methods:
        for rank in map(str, range(4)):
            got = ranks[rank][method]
            assert got["steps"] == STEPS, (method, rank, got)
        # Every message sent was received: what one rank sent, some other rank took.
        sent = sum(ranks[r][method]["sent"] for r in ranks)
        received = sum(ranks[r][method]["received"] for r in ranks)
        assert sent == received > 0, (method, sent, received)


@pytest.mark.slow
def test_a_message_keeps_its_kind_step_and_labels_over_the_wire(tmp_path) -> None:
    """Header, payload and labels go as one batch: what arrives is what was sent."""
    done = _run_ranks(tmp_path / "echo.json", ["--echo"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _task():
    from dni_dist.core.tasks import Task

    return Task("classification", 10)
