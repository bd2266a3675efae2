"""One job per output folder (a dataset or a training run): an advisory ``flock`` on ``OUT/.lock``, released by
the OS even on kill -9."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path


class FolderLockedError(RuntimeError):
    pass


class FolderLock:
    """Exclusive lock on a local dataset folder; a second holder gets ``FolderLockedError`` at once."""

    def __init__(self, folder: str) -> None:
        self._path = Path(folder) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise FolderLockedError(
                f"{self._path.parent} is being written by another mbm job ({holder or 'unknown holder'}); "
                "wait for it to finish or use another output folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
