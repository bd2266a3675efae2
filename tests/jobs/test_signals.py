import contextlib
import os
import signal

import pytest

from jobs.signals import Terminated, held_stop, hold_stops, pending, stop_signals


@pytest.fixture(autouse=True)
def _keep_handler():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGTERM, before[0])
    signal.signal(signal.SIGINT, before[1])


def test_sigterm_raises_terminated_once_and_later_ones_are_ignored():
    with pytest.raises(Terminated), stop_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 5)  # never reached: the handler raises at the next bytecode
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # a second one cannot cut the clean-up short
    os.kill(os.getpid(), signal.SIGTERM)  # ignored: this test goes on


def test_a_command_that_takes_the_signal_on_is_not_interrupted():
    took = []
    with stop_signals(lambda: took.append(1) or True):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # only the first one reaches the command
    assert took == [1]
    declined = []
    with pytest.raises(Terminated), stop_signals(lambda: declined.append(1) or False):
        os.kill(os.getpid(), signal.SIGTERM)
    assert declined == [1]


def test_the_stop_is_passed_on_once_at_the_first_ctrl_c_or_sigterm():
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for first, then in ((signal.SIGINT, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGINT)):
        told: list[int] = []
        with pytest.raises(KeyboardInterrupt), stop_signals(passed_on=lambda told=told: told.append(1)):
            try:
                os.kill(os.getpid(), first)
                signal.sigtimedwait([], 5)
            finally:
                with pytest.raises(KeyboardInterrupt) if then == signal.SIGINT else contextlib.nullcontext():
                    os.kill(os.getpid(), then)  # a second one: not passed on again (a SIGTERM is ignored)
                    signal.sigtimedwait([], 5)
        assert told == [1]
    took = []
    with stop_signals(lambda: True, passed_on=lambda: took.append(1)):  # taken on: nothing to pass on
        os.kill(os.getpid(), signal.SIGTERM)
    assert took == []

def test_the_handler_before_is_back_when_no_sigterm_came():
    def mine(signum, frame):
        """A handler of the test's own: it does nothing."""

    signal.signal(signal.SIGTERM, mine)
    with stop_signals():
        assert signal.getsignal(signal.SIGTERM) is not mine
    assert signal.getsignal(signal.SIGTERM) is mine


def test_terminated_is_handled_where_ctrl_c_is():
    assert issubclass(Terminated, KeyboardInterrupt) and not issubclass(Terminated, Exception)


def test_ctrl_c_raises_with_a_message_so_beam_keeps_its_type():
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt) as raised, stop_signals():
        os.kill(os.getpid(), signal.SIGINT)
        signal.sigtimedwait([], 5)
    assert raised.value.args == ("Ctrl-C",)  # Beam adds its step's name to args[0] and re-raises the type
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigint_ignored_from_the_start_stays_ignored():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a job started in the background
    with stop_signals():
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)  # nothing happens
    assert pending() is None


def test_an_interrupt_that_c_drops_is_still_pending_and_not_printed(capsys):
    from tests.support.signals import send_dropped

    signal.signal(signal.SIGINT, signal.default_int_handler)
    with stop_signals():
        send_dropped()  # from a finalizer, where what is raised is dropped, as in a callback from C
        dropped = pending()
        assert isinstance(dropped, KeyboardInterrupt) and not isinstance(dropped, Terminated)
    assert "Exception ignored" not in capsys.readouterr().err
    assert pending() is None  # it belonged to the block


def test_stops_held_after_the_commit_point_are_kept_not_raised():
    from tests.support.signals import send

    signal.signal(signal.SIGINT, signal.default_int_handler)
    passed = []
    with stop_signals(passed_on=lambda: passed.append(1)):
        hold_stops()
        send(signal.SIGTERM)
        send(signal.SIGINT)
        assert isinstance(held_stop(), Terminated) and pending() is None
    assert held_stop() is None and passed == []  # the command finishes: nothing to stop
    with pytest.raises(KeyboardInterrupt), stop_signals():  # a new block holds nothing
        send(signal.SIGINT)
