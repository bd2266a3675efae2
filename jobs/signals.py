"""Ctrl-C and SIGTERM, raised where a command can clean up after them.

SIGTERM is how a container runtime, Kubernetes (a pod's eviction or deletion) or a batch scheduler
(Slurm at a time limit or a preemption) stops a job, with a grace period before SIGKILL. Python's default
ends the process on the spot: no message, and whatever the process was in the middle of is left as
it was. While a command runs inside ``stop_signals``, SIGTERM raises ``Terminated`` in the main
thread, as Ctrl-C raises KeyboardInterrupt, so the clean-up Ctrl-C gets runs for it too; ``first``
lets a command take SIGTERM on its own way (a training loop checkpoints the step it is in and stops).

Both carry a message: Beam, when a DoFn it runs in this process raises (a run of one worker),
re-raises the same type with the step's name added to ``args[0]``, but wraps an exception without one
in a RuntimeError, which read as a failed job rather than a stopped one. And an exception raised in a
callback from C (cffi's, which soundfile reads its input through) is printed and dropped there, so the
command went on as if nothing had come, committing its work: ``pending()`` says one came.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a tool that SIGPIPE ends reports (`yes | head -1`)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: the command stops as on Ctrl-C."""

    def __init__(self, message: str = "SIGTERM") -> None:
        super().__init__(message)


_pending: KeyboardInterrupt | None = None
_holding = False  # hold_stops() was called in the current stop_signals block
_held: KeyboardInterrupt | None = None


def report(stop: KeyboardInterrupt) -> int:
    """Say in one line how the command was stopped; the exit status for it (130 Ctrl-C, 143 SIGTERM)."""
    if isinstance(stop, Terminated):
        print("mbm: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    print("mbm: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


def broken_pipe() -> int:
    """The reader of stdout went away (``mbm versions DIR | head -1``): say nothing more, as a Unix tool
    that SIGPIPE ends says nothing, and return its exit status. stdout then points at /dev/null, so that
    the interpreter's last flush of what it still holds does not fail again ("Exception ignored")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def pending() -> KeyboardInterrupt | None:
    """The interrupt raised while the current ``stop_signals`` block runs, if one was; check it before
    committing work, in case something between the handler and the command dropped it."""
    return _pending


def hold_stops() -> None:
    """From now until the current ``stop_signals`` block ends, Ctrl-C and SIGTERM are kept (``held_stop()``)
    instead of raised: the command is past the point after which stopping would leave its work half
    written instead of undone (a job's new version has been made current, or is being made so, and its
    other files are still to write). The command then finishes, and says that a stop came."""
    global _holding
    _holding = True


def held_stop() -> KeyboardInterrupt | None:
    """The first Ctrl-C or SIGTERM that came while stops were held (``hold_stops``), if one did."""
    return _held


@contextlib.contextmanager
def stop_signals(first: Callable[[], bool] | None = None,
                 passed_on: Callable[[], None] | None = None) -> Iterator[None]:
    """While open, SIGTERM raises ``Terminated`` in the main thread, unless ``first()`` (called in the
    handler) returns True: the command took the signal on and stops by itself. Only the first SIGTERM
    counts; later ones are ignored, so that they cannot cut the clean-up short (the sender's SIGKILL
    still ends it). Ctrl-C raises KeyboardInterrupt as Python's own handler does, with a message (none
    is installed where SIGINT was ignored from the start: a job run in the background). ``passed_on()``
    runs once, at the first of either that stops the command: a job's driver passes the stop on to its
    workers, which a signal sent to its pid alone does not reach. The handlers before are put back on
    leaving, SIGTERM's only if none came. Outside the main thread, where handlers cannot be set, this
    does nothing."""
    global _pending, _holding, _held
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False
    passed = False

    def pass_on() -> None:
        nonlocal passed
        if passed_on is not None and not passed:
            passed = True
            passed_on()

    def on_sigterm(signum: int, frame: Any) -> None:
        global _pending, _held
        nonlocal fired
        fired = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if _holding:
            _held = _held or Terminated()
            return
        if first is not None and first():
            return
        pass_on()
        _pending = Terminated()
        raise _pending

    def on_sigint(signum: int, frame: Any) -> None:
        global _pending, _held
        if _holding:
            _held = _held or KeyboardInterrupt("Ctrl-C")
            return
        pass_on()
        _pending = KeyboardInterrupt("Ctrl-C")
        raise _pending

    def unraisable(what: Any) -> None:  # where C drops an exception: ours is kept in pending(), not printed
        if what.exc_value is None or what.exc_value is not _pending:
            before_hook(what)

    _pending, _holding, _held = None, False, None
    before_hook = sys.unraisablehook
    sys.unraisablehook = unraisable
    before_term = signal.signal(signal.SIGTERM, on_sigterm)
    before_int = signal.getsignal(signal.SIGINT)
    if before_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        _pending, _holding, _held = None, False, None  # what came belongs to this block
        sys.unraisablehook = before_hook
        signal.signal(signal.SIGTERM, signal.SIG_IGN if fired else before_term)
        if before_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, before_int)
