"""Signals a test sends its own process, with room for Python to run the handler.

Python runs a signal's handler in the main thread between two bytecodes; ``os.kill`` returns before
that, so each sender runs a loop of bytecodes after it. ``send_dropped`` sends SIGINT from a
finalizer, where what the handler raises is dropped (given to ``sys.unraisablehook``), as it is in a
callback from C such as cffi's.
"""

from __future__ import annotations

import os
import signal


def _give_the_handler_its_turn() -> None:
    """Bytecodes after ``os.kill``, between which Python runs the pending handler."""
    turns = 0
    while turns < 10_000:
        turns += 1


def send(signum: int) -> None:
    os.kill(os.getpid(), signum)
    _give_the_handler_its_turn()


class _SendsOnFree:
    def __del__(self) -> None:
        send(signal.SIGINT)


def send_dropped() -> None:
    _SendsOnFree()  # made and freed at once: the finalizer runs here
