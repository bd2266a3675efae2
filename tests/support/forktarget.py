"""A stand-in for Beam's SDK worker main, run by forked children in tests/pipelines/test_forkserver.py."""

import os
import sys
import time


def main(argv):
    print(f"child {os.getpid()} says {os.environ.get('FORK_TEST_WORD')}", flush=True)
    if os.environ.get("FORK_TEST_SLEEP"):
        time.sleep(float(os.environ["FORK_TEST_SLEEP"]))
    sys.exit(int(os.environ.get("FORK_TEST_CODE", "0")))


def killed(argv):
    """Says its pid, then waits to be killed (or FORK_TEST_SIGNAL kills it at once)."""
    import signal

    print(f"child {os.getpid()} waits", flush=True)
    if os.environ.get("FORK_TEST_SIGNAL"):
        os.kill(os.getpid(), getattr(signal, os.environ["FORK_TEST_SIGNAL"]))
    time.sleep(60)


def gc_state(argv):
    """Says whether collection is on and how many objects are frozen (never walked by a collection)."""
    import gc

    print(f"child {os.getpid()} gc {gc.isenabled()} {gc.get_freeze_count()}", flush=True)
