"""A Ctrl-C stops a run even when the KeyboardInterrupt it raises is swallowed."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import pytest

from dni_dist.operations import interrupts


def test_a_swallowed_ctrl_c_is_raised_again_at_the_next_check() -> None:
    with interrupts.recorded():
        interrupts.check()  # nothing requested yet
        # What a library's callback or finaliser does to the KeyboardInterrupt it was handed:
        with contextlib.suppress(BaseException):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs at the next bytecode boundaries
                pass
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    interrupts.check()  # the request ends with the block; the previous handler is back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outside_the_main_thread_recording_changes_nothing() -> None:
    seen: list[object] = []

    def body() -> None:
        with interrupts.recorded():
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]
