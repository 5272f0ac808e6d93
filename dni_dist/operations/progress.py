"""What a run prints while it trains: a live bar on a terminal, plain lines in logs.

Modes (config ``progress``): ``bar`` is a tqdm bar over the run's total steps with the last
loss and accuracy, and one line per epoch above it; ``lines`` prints one line per epoch and,
within a long epoch, a progress line at most every ``every_seconds`` (``ray job logs`` and
CI logs cannot show a carriage-return bar); ``off`` prints nothing; ``auto`` is ``bar`` when
the stream is a terminal, else ``lines``.

The epoch line is the epoch record of metrics.jsonl as ``key=value`` pairs, as before.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

MODES = ("auto", "bar", "lines", "off")


def resolve_mode(mode: str, stream: TextIO) -> str:
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


class Progress:
    def __init__(
        self,
        mode: str,
        epochs: int,
        steps_per_epoch: int,
        batch_size: int,
        stream: TextIO | None = None,
        every_seconds: float = 10.0,
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.mode = resolve_mode(mode, self.stream)
        self.epochs = epochs
        self.total = epochs * steps_per_epoch
        self.batch_size = batch_size
        self.every_seconds = every_seconds
        self._start: tuple[float, int] | None = None  # (time, step) when training began
        self._last_line = 0.0
        self._bar: tqdm | None = None
        if self.mode == "bar":
            # A pty that reports no size (some CI, `kubectl exec -t`) would make tqdm draw nothing.
            size = shutil.get_terminal_size((100, 24))
            self._bar = tqdm(
                total=self.total, file=self.stream, unit="step", ncols=size.columns, nrows=size.lines, leave=True
            )

    def begin_epoch(self, epoch: int, first_step: int) -> None:
        if self._start is None:
            self._start = (time.monotonic(), first_step)
            self._last_line = self._start[0]

    def steps(self, done: int, epoch: int) -> None:
        """``done`` steps of the run are complete (live, from the stages, mid-epoch)."""
        if self._bar is not None:
            if done > self._bar.n:
                self._bar.update(done - self._bar.n)
        elif self.mode == "lines":
            now = time.monotonic()
            if now - self._last_line >= self.every_seconds:
                self._last_line = now
                rate = self._rate(done)
                parts = [f"epoch={epoch + 1}/{self.epochs}", f"step={done}/{self.total}"]
                if rate:
                    parts += [f"samples_per_second={rate * self.batch_size:.4g}", f"eta={self._eta(done, rate)}"]
                self._print(" ".join(parts))

    def epoch(self, record: dict[str, Any]) -> None:
        """An epoch ended; ``record`` is its metrics.jsonl record."""
        if self.mode == "off":
            return
        done = int(record["step"])
        line = " ".join(_fmt(k, v) for k, v in record.items() if k != "event")
        rate = self._rate(done)
        if rate and record["epoch"] < self.epochs:
            line += f" eta={self._eta(done, rate)}"
        self._last_line = time.monotonic()
        if self._bar is not None:
            if done > self._bar.n:
                self._bar.update(done - self._bar.n)
            postfix = {"loss": f"{record['train_loss']:.4g}"}
            if record.get("test_accuracy") is not None:
                postfix["acc"] = f"{record['test_accuracy']:.4g}"
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.write(line, file=self.stream)
        else:
            self._print(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ----------------------------------------------------------------- helpers
    def _rate(self, done: int) -> float:
        """Steps per second since training began (evaluation included: it is part of the ETA)."""
        if self._start is None:
            return 0.0
        seconds, steps = time.monotonic() - self._start[0], done - self._start[1]
        return steps / seconds if seconds > 0 and steps > 0 else 0.0

    def _eta(self, done: int, rate: float) -> str:
        return _duration(max(0, self.total - done) / rate)

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def _fmt(key: str, value: Any) -> str:
    return f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"


def _duration(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
