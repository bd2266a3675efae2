import os
import signal

import pytest

from jobs.signals import Terminated, sigterm_as_interrupt


@pytest.fixture(autouse=True)
def _keep_handler():
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def test_sigterm_raises_terminated_once_and_later_ones_are_ignored():
    with pytest.raises(Terminated), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 5)  # never reached: the handler raises at the next bytecode
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # a second one cannot cut the clean-up short
    os.kill(os.getpid(), signal.SIGTERM)  # ignored: this test goes on


def test_a_command_that_takes_the_signal_on_is_not_interrupted():
    took = []
    with sigterm_as_interrupt(lambda: took.append(1) or True):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # only the first one reaches the command
    assert took == [1]
    declined = []
    with pytest.raises(Terminated), sigterm_as_interrupt(lambda: declined.append(1) or False):
        os.kill(os.getpid(), signal.SIGTERM)
    assert declined == [1]


def test_the_handler_before_is_back_when_no_sigterm_came():
    def mine(signum, frame):
        pass

    signal.signal(signal.SIGTERM, mine)
    with sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not mine
    assert signal.getsignal(signal.SIGTERM) is mine


def test_terminated_is_handled_where_ctrl_c_is():
    assert issubclass(Terminated, KeyboardInterrupt) and not issubclass(Terminated, Exception)
