"""One file per Beam bundle that byte strings are appended to (computed features, media bytes a reader
holds), so that only references to them travel through the job's shuffles."""

from __future__ import annotations

import os
import uuid
from typing import Any

from pipelines.errors import disk_guard


class BundleFile:
    """Appends byte strings to one file in ``folder``, created on the first append under a fresh name (a
    retried bundle never appends to a failed one's file); ``close`` at the end of the bundle, before it
    commits (readers come after the shuffle). A full disk raises ``ResourceError`` saying ``what``."""

    def __init__(self, folder: str, what: str) -> None:
        self._folder, self._what = folder.rstrip("/"), what
        self._file: Any = None
        self._path, self._offset = "", 0

    def append(self, data: bytes) -> tuple[str, int]:
        """Writes ``data``; returns the file's path and the offset ``data`` starts at."""
        from apache_beam.io.filesystems import FileSystems

        with disk_guard(self._what, self._folder):
            if self._file is None:
                self._path = f"{self._folder}/{uuid.uuid4().hex}.bin"
                self._file = FileSystems.create(self._path, mime_type="application/octet-stream")
                self._offset = 0
            self._file.write(data)
        offset, self._offset = self._offset, self._offset + len(data)
        return self._path, offset

    def close(self) -> None:
        if self._file is not None:
            with disk_guard(self._what, self._folder):
                self._file.close()
            self._file = None


def short_read(path: str, offset: int, length: int, got: int, what: str = "spill file") -> RuntimeError:
    """The error for a file that holds fewer bytes than were written or staged there."""
    return RuntimeError(f"{what} {path} is short: wanted {length} bytes at {offset}, got {got}")


def pread_exact(fd: int, size: int, offset: int, path: str, what: str) -> bytes:
    """``size`` bytes at ``offset`` of the open file ``fd`` (Linux reads at most ~2 GiB a call, so this
    loops); ``short_read`` when the file (``path``, a ``what``) ends before."""
    parts, got = [], 0
    while got < size:
        part = os.pread(fd, size - got, offset + got)
        if not part:
            raise short_read(path, offset, size, got, what)
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)
