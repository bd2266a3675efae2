"""Where shard scans are kept on disk (``MBM_SCAN_DIR``), and their clean-up: without torch, for ``mbm gc``.

``mbm.data.scan`` writes and reads the files; the dataset commands delete those of the shards they delete.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

OFF = "off"
UNUSEDDAYS = 30  # a scan file neither written nor read for this long is deleted (``prune``)
DAY = 86400


def default_folder() -> str:
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mbm", "scan")


def env_folder() -> str | None:
    """``MBM_SCAN_DIR``: the folder of the scans kept on disk, None for ``off``."""
    value = os.environ.get("MBM_SCAN_DIR", "").strip()
    if value.lower() == OFF:
        return None
    return value or default_folder()


def scan_file(folder: str, path: str) -> str:
    """Where the scan of the shard at ``path`` is kept in ``folder``."""
    name = hashlib.sha1(os.path.abspath(path).encode("utf-8", "surrogateescape")).hexdigest()
    return os.path.join(folder, name + ".scan")


def forget(paths: Iterable[str], folder: str | None = None) -> int:
    """Delete the kept scans of the shards at ``paths`` (deleted shards), in ``folder`` (default
    ``MBM_SCAN_DIR``'s); returns the number deleted. Scans of the same shards named by another path (a
    symbolic link) stay until ``prune`` deletes them."""
    folder = env_folder() if folder is None else folder
    if folder is None:
        return 0
    deleted = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scan_file(folder, path))
            deleted += 1
    return deleted


def prune(folder: str) -> int:
    """Delete the scan files in ``folder`` that no process wrote or read for ``UNUSEDDAYS`` days (their shards
    deleted, or a dataset version no longer read) and temporary files left for a day; at most once a day
    (``.pruned``'s mtime says when it last ran). Returns the number of files deleted."""
    now = time.time()
    marker = os.path.join(folder, ".pruned")
    with contextlib.suppress(OSError):
        if now - os.stat(marker).st_mtime < DAY:
            return 0
    try:
        Path(marker).touch()  # created, or its mtime set to now
    except OSError:
        return 0
    deleted = 0
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                age = now - entry.stat(follow_symlinks=False).st_mtime
                if ((entry.name.endswith(".scan") and age > UNUSEDDAYS * DAY)
                        or (entry.name.endswith(".tmp") and age > DAY)):
                    os.unlink(entry.path)
                    deleted += 1
    if deleted:
        log.info("deleted %d shard scan file(s) unused for %d days from %s", deleted, UNUSEDDAYS, folder)
    return deleted
