"""The progress display: lines for logs, a bar for terminals, silence when asked."""

from __future__ import annotations

import io
import json
import re

import pytest

from dni_dist.cli import main
from dni_dist.operations.progress import Progress, resolve_mode

RECORD = {
    "event": "epoch",
    "epoch": 1,
    "step": 10,
    "train_loss": 0.51234,
    "test_loss": 0.4,
    "test_accuracy": 0.875,
    "samples_per_second": 1234.5,
}


def test_lines_mode_prints_one_line_per_epoch_and_periodic_progress_lines(capsys) -> None:
    progress = Progress("lines", epochs=2, steps_per_epoch=10, batch_size=4, every_seconds=0.0)
    progress.begin_epoch(0, 0)
    progress.steps(5, epoch=0)
    progress.epoch(RECORD)
    progress.epoch({**RECORD, "epoch": 2, "step": 20})
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert re.fullmatch(r"epoch=1/2 step=5/20 samples_per_second=\S+ eta=\d+s", lines[0]), lines[0]
    assert re.fullmatch(
        r"epoch=1 step=10 train_loss=0.5123 test_loss=0.4 test_accuracy=0.875 samples_per_second=1234 eta=\d+s",
        lines[1],
    ), lines[1]
    assert lines[2].startswith("epoch=2 step=20 ") and "eta=" not in lines[2]  # nothing left to wait for


def test_lines_mode_limits_progress_lines_to_one_per_interval(capsys) -> None:
    progress = Progress("lines", epochs=1, steps_per_epoch=100, batch_size=4, every_seconds=3600.0)
    progress.begin_epoch(0, 0)
    for done in range(1, 50):
        progress.steps(done, epoch=0)
    assert capsys.readouterr().out == ""


def test_bar_mode_writes_a_bar_and_epoch_lines_to_a_non_terminal() -> None:
    out = io.StringIO()
    progress = Progress("bar", epochs=2, steps_per_epoch=10, batch_size=4, stream=out)
    progress.begin_epoch(0, 0)
    progress.steps(5, epoch=0)
    progress.epoch(RECORD)
    progress.epoch({**RECORD, "epoch": 2, "step": 20})
    progress.close()
    text = out.getvalue()
    assert "20/20" in text and "epoch=1 step=10 train_loss=0.5123" in text and "acc=0.875" in text


def test_auto_is_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_mode("auto", Tty()) == "bar"
    assert resolve_mode("auto", io.StringIO()) == "lines"
    assert resolve_mode("off", Tty()) == "off"


@pytest.mark.parametrize("flags", [["--quiet"], ["--progress", "off"]])
def test_quiet_and_off_print_only_the_final_brief(tmp_path, capsys, flags: list[str]) -> None:
    assert main(["train", "--method", "backprop", "--epochs", "2", "--out", str(tmp_path), *flags]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["method"] == "backprop" and lines[1].startswith("wrote ")


def test_a_cli_run_in_a_log_prints_lines(tmp_path, capsys) -> None:
    assert main(["train", "--method", "backprop", "--epochs", "2", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    epochs = [line for line in lines if line.startswith("epoch=")]
    assert [line.split()[0] for line in epochs] == ["epoch=1", "epoch=2"]
    assert "eta=" in epochs[0] and "\r" not in "".join(lines)  # auto on a non-terminal: plain lines
