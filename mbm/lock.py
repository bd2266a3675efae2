"""One job per output folder (a dataset or a training run): an advisory ``lockf`` record lock on
``OUT/.lock``, released by the OS when the holding process ends, even on kill -9. And readers of a dataset
version (a training, an evaluation): a shared ``flock`` on its ``versions/N.json``, which ``mbm gc`` asks
about before it deletes a version."""

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
    """Exclusive lock on a local dataset or run folder; a second holder gets ``FolderLockedError`` at once.

    A POSIX record lock (``lockf``) belongs to the process that took it: processes it forks (Beam
    workers, data-loader workers) do not hold it, so the folder is free the moment that process dies,
    even while its children are still winding down. Such a lock does not exclude the same process,
    so ``_HELD`` does.
    """

    _HELD: set[str] = set()

    def __init__(self, folder: str) -> None:
        self._path = Path(folder) / ".lock"
        self._fd: int | None = None

    def _refuse(self, holder: str) -> FolderLockedError:
        return FolderLockedError(
            f"{self._path.parent} is being written by another mbm job ({_holder(holder)}); "
            "wait for it to finish or use another output folder"
        )

    def __enter__(self) -> FolderLock:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self._path)
        if key in self._HELD:
            raise self._refuse(f"pid {os.getpid()}, this process")
        # 0o666 less the umask, as for the folder's other files: a group that may write the dataset (umask 002)
        # may also take its lock
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EAGAIN / EACCES: held
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise self._refuse(holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
        self._fd, self._key = fd, key
        self._HELD.add(key)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            self._HELD.discard(self._key)


def _holder(text: str) -> str:
    """The lock file's record of its holder, as words: ``pid 123 on host, since 2024-05-01T12:00:00``."""
    try:
        record = json.loads(text)
        said = f"pid {record['pid']} on {record['host']}, since {record['since']}"
    except (ValueError, TypeError, KeyError):
        return text or "unknown holder"
    return said


_READING: dict[str, int] = {}  # version manifests this process reads -> the descriptor holding the lock


def _flocked(path: str, mode: int) -> int | None:
    """A descriptor of ``path`` holding ``flock(mode)`` (non-blocking), or None where another process holds a
    lock that conflicts; OSError where the file cannot be opened."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError:  # EWOULDBLOCK
        os.close(fd)
        return None
    return fd


def hold_version(manifest: str) -> bool:
    """Take a shared lock on a dataset version's manifest (``OUT/versions/N.json``) for the rest of this
    process (and of the loader workers it forks, which share it): ``mbm gc`` keeps a version so held. False
    where it cannot be taken (no such file, a folder that cannot be opened, gc deleting it right now)."""
    key = os.path.realpath(manifest)
    if key not in _READING:
        try:
            fd = _flocked(key, fcntl.LOCK_SH)
        except OSError:
            return False
        if fd is None:
            return False
        _READING[key] = fd
    return True


def version_in_use(manifest: str) -> bool:
    """Whether a running process holds ``hold_version`` on ``manifest``."""
    try:
        fd = _flocked(manifest, fcntl.LOCK_EX)
    except OSError:
        return False
    if fd is None:
        return True
    os.close(fd)  # also releases the exclusive lock taken to ask
    return False
