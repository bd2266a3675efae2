"""Shards whose scans ``mbm.data.scan`` keeps on disk."""

from __future__ import annotations

import os
import time

SETTLED = 300_000_000  # ns: scan._SETTLED while a test settles its shards


def settle_shards(monkeypatch, *paths) -> None:
    """Make the shards at ``paths`` count as settled, so that their scans are kept on disk: their mtimes set
    an hour back, the scan's settling time shortened to ``SETTLED``, and a wait until their status-change
    times (which no call can set back) are that old."""
    import mbm.data.scan as scan

    monkeypatch.setattr(scan, "_SETTLED", SETTLED)
    wait_settled(*paths)


def wait_settled(*paths) -> None:
    """``settle_shards`` with ``scan._SETTLED`` already ``SETTLED``."""
    then = time.time_ns() - 3600 * 10**9
    for path in paths:
        os.utime(path, ns=(then, then))
    newest = max(os.stat(path).st_ctime_ns for path in paths)
    time.sleep(max(0.0, (newest + SETTLED + 10_000_000 - time.time_ns()) / 1e9))
