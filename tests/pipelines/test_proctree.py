import os
import signal
import subprocess
import sys
import time

import pytest

from pipelines.forkclient import running
from pipelines.proctree import descendants, parent, signal_descendants

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _wait_for(predicate, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_descendants_are_children_and_theirs_and_signal_reaches_them_all():
    # a shell whose child is a shell whose child sleeps: three generations below this test
    tree = subprocess.Popen(["sh", "-c", "sh -c 'sleep 60; true' & wait"])
    try:
        _wait_for(lambda: len(descendants(tree.pid)) == 2)
        child, grandchild = descendants(tree.pid)
        assert parent(child) == tree.pid and parent(grandchild) == child
        assert tree.pid in descendants(os.getpid()) and tree.pid not in descendants(tree.pid)
        assert sorted(signal_descendants(tree.pid, signal.SIGTERM)) == sorted([child, grandchild])
        _wait_for(lambda: tree.poll() is not None)  # its child gone, the shell's `wait` returns
        _wait_for(lambda: not running(grandchild))
        assert tree.pid not in descendants(os.getpid())
    finally:
        tree.kill()
        tree.wait()


def test_a_process_that_is_gone_has_no_parent_and_no_descendants():
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert parent(gone.pid) == 0
    assert descendants(gone.pid) == [] and signal_descendants(gone.pid, signal.SIGTERM) == []
