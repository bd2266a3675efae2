"""SIGTERM, handled as Ctrl-C is.

SIGTERM is how a container runtime, Kubernetes (a pod's eviction or deletion) or a batch scheduler
(Slurm at a time limit or a preemption) stops a job, with a grace period before SIGKILL. Python's default
ends the process on the spot: no message, and whatever the process was in the middle of is left as
it was. While a command runs, ``sigterm_as_interrupt`` makes SIGTERM raise ``Terminated`` in the main
thread, as SIGINT raises KeyboardInterrupt, so the clean-up Ctrl-C gets runs for it too; ``first``
lets a command take the signal on its own way (a training loop checkpoints the step it is in and stops).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: the command stops as on Ctrl-C."""


@contextlib.contextmanager
def sigterm_as_interrupt(first: Callable[[], bool] | None = None) -> Iterator[None]:
    """SIGTERM raises ``Terminated`` in the main thread while this is open, unless ``first()`` (called
    in the handler) returns True: the command took the signal on and stops by itself. Only the first
    SIGTERM counts; later ones are ignored, so that they cannot cut the clean-up short (the sender's
    SIGKILL still ends it). The handler before is put back on leaving, if no SIGTERM came. Outside the
    main thread, where handlers cannot be set, this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    fired = False

    def on_sigterm(signum: int, frame: Any) -> None:
        nonlocal fired
        fired = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if first is not None and first():
            return
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN if fired else previous)
