"""A stand-in for Beam's SDK worker main, run by forked children in tests/pipelines/test_forkserver.py."""

import os
import sys
import time


def main(argv):
    print(f"child {os.getpid()} says {os.environ.get('FORK_TEST_WORD')}", flush=True)
    if os.environ.get("FORK_TEST_SLEEP"):
        time.sleep(float(os.environ["FORK_TEST_SLEEP"]))
    sys.exit(int(os.environ.get("FORK_TEST_CODE", "0")))
