"""Loading raw media bytes from a path, a URI, or bytes already in hand."""

from __future__ import annotations

import io
import os
import stat
import time
import unicodedata
from dataclasses import dataclass
from typing import Any

from pipelines.errors import CleanError
from schemas import Media

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
#: seconds a file must have gone unchanged before its identity stands for its bytes (``media_identity``)
SETTLED = 2.0
#: the same for a remote object, whose update time comes from its store's clock, not this machine's
REMOTE_SETTLED = 60.0
#: object stores whose server sets an object's update time at every write, which no client can set back
#: (HDFS takes a client's modification time; a local file is keyed by its status-change time instead)
KEYED_SCHEMES = frozenset({"gs", "s3", "azfs"})


def read_media(media: Media, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of ``media``; missing, unreadable, empty or oversized files raise ``CleanError``."""
    if media.data is not None:
        data = media.data
    elif media.offset is not None:
        if media.size > max_bytes:  # its tar header says so: not read
            raise CleanError("file.too_large", f"{media.describe()} has {media.size} bytes, limit is {max_bytes}")
        data = _read_range(media) if media.size else b""
    else:
        data = _read_uri(media.uri or "", max_bytes)
    if len(data) == 0:
        raise CleanError("file.empty", f"{media.describe()} is empty (0 bytes)")
    if len(data) > max_bytes:
        raise CleanError("file.too_large", f"{media.describe()} has {_size(media, data)} bytes, limit is {max_bytes}")
    return data


def _size(media: Media, data: bytes) -> str:
    """The size of media found over the limit: a file is read only to one byte past it, so its size is
    asked of the file system ("more than N" where it cannot say)."""
    if media.data is not None or media.offset is not None:
        return str(len(data))
    from pipelines.readers.common import local_path

    path = local_path(media.uri or "")
    try:
        return str(os.path.getsize(path)) if path is not None else f"more than {len(data) - 1}"
    except OSError:
        return f"more than {len(data) - 1}"


@dataclass(frozen=True)
class LocalFile:
    """Media over the limit of what is held in memory, left where they are: the ``size`` bytes at ``offset``
    of a local file (the whole file, or a member of an uncompressed tar). The cleaner reads what it keeps
    (an audio cleaner decodes at most ``max_seconds`` of a clip) through ``open()``; ``head`` and ``tail``
    give the first and last bytes, for saying what media that do not decode are."""

    path: str
    size: int
    name: str
    offset: int = 0

    SNIFF = 70_000  # bytes: more than an Ogg page (at most 65,307), so the tail holds the last page's start

    def open(self) -> io.BufferedReader:
        """The media's bytes as a seekable file of their own."""
        return io.BufferedReader(_Window(self.path, self.offset, self.size), buffer_size=1 << 16)

    def head(self) -> bytes:
        with self.open() as f:
            return f.read(self.SNIFF)

    def tail(self) -> bytes:
        with self.open() as f:
            f.seek(max(0, self.size - self.SNIFF))
            return f.read(self.SNIFF)


class _Window(io.RawIOBase):
    """``size`` bytes at ``offset`` of the file at ``path``, read as a file that starts at 0 and ends there."""

    def __init__(self, path: str, offset: int, size: int) -> None:
        super().__init__()
        self._f = open(path, "rb")  # noqa: SIM115 - closed with the window
        self._start, self._size, self._at = offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._size - self._at)
        if want <= 0:
            return 0
        n = os.preadv(self._f.fileno(), [memoryview(buffer)[:want]], self._start + self._at)
        self._at += n
        return n

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: self._size}[whence]
        self._at = max(0, base + pos)
        return self._at

    def tell(self) -> int:
        return self._at

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def large_local_file(media: Media, max_bytes: int) -> LocalFile | None:
    """``media`` as a ``LocalFile`` where it is a regular local file, or a member of one (an uncompressed
    tar's), of more than ``max_bytes``; else None."""
    if media.data is not None or (found := _regular_file(media.uri)) is None:
        return None
    path, st = found
    if media.offset is not None:
        return LocalFile(path=path, size=media.size, name=media.describe(), offset=media.offset) \
            if media.size > max_bytes else None
    return LocalFile(path=path, size=st.st_size, name=media.describe()) if st.st_size > max_bytes else None


def _regular_file(uri: str | None) -> tuple[str, os.stat_result] | None:
    """The local path of ``uri`` and its ``os.stat``, where it names a regular local file."""
    from pipelines.readers.common import local_path

    path = local_path(uri) if uri is not None else None
    if path is None:
        return None
    try:
        st = os.stat(path)
    except (OSError, ValueError, UnicodeError):
        return None
    return (path, st) if stat.S_ISREG(st.st_mode) else None


def media_identity(media: Media) -> str | None:
    """What says, without reading them, that a local file's bytes (or a tar member's) are the ones read
    before: its path, size, modification and status-change times and inode, and a member's offset and size.
    The status-change time moves with every write and cannot be set back (``cp -p`` and ``touch -d`` set the
    modification time only). A remote object's is its path and the ``stamp`` its folder's listing gave it
    (``remote_stamp``). None for bytes in hand, a remote URI without a stamp, anything else but a regular file,
    and a file changed less than ``SETTLED`` seconds ago: a write in the same clock tick as the one before it
    would leave every field as it was (git's "racily clean" files)."""
    if media.data is not None:
        return None
    member = "" if media.offset is None else f"\0{media.offset}\0{media.size}"
    if media.stamp is not None:  # a remote object, as its folder's listing found it
        return f"{media.uri}\0{media.stamp}{member}"
    if (found := _regular_file(media.uri)) is None:
        return None
    st = found[1]
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < SETTLED * 1e9:
        return None
    return f"{media.uri}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}{member}"


def remote_stamp(path: str, size: int, updated: float) -> str | None:
    """What a listing's metadata of a remote object (Beam's ``FileMetadata``: its size and the update time
    its store set) says of its bytes, for ``Media.stamp``: a later listing that gives the same stamp for
    the same path lists the same bytes. None outside ``KEYED_SCHEMES``, without an update time, and for an
    object updated less than ``REMOTE_SETTLED`` seconds ago: a write within the same tick of the store's
    clock would give the same stamp, and the margin covers a clock of this machine that runs ahead."""
    scheme, sep, _ = path.partition("://")
    if not sep or scheme.lower() not in KEYED_SCHEMES or not updated or time.time() - updated < REMOTE_SETTLED:
        return None
    return f"{size}\0{updated!r}"


_SPECIAL = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"))


def check_regular(uri: str) -> None:
    """A local path that is a named pipe, socket or device is refused before it is opened: reading a
    pipe nobody writes to would block the worker forever. A path no file system can name (a lone
    surrogate) is ``file.unreadable``; a missing one is left for opening to report."""
    from pipelines.readers.common import local_path

    path = local_path(uri)
    if path is None:
        return
    try:
        mode = os.stat(path).st_mode
    except (ValueError, UnicodeError) as e:
        raise CleanError("file.unreadable", f"{uri!r} is not a path this file system can name ({e})") from None
    except OSError:
        return  # opening it reports what is wrong
    for test, what in _SPECIAL:
        if test(mode):
            raise CleanError("file.unreadable", f"{uri} is {what}, not a regular file")


def _read_range(media: Media) -> bytes:
    """The ``size`` bytes at ``offset`` of the file at ``uri`` (a tar member). Fewer than ``size`` means
    the file was cut or replaced since it was listed."""
    from apache_beam.io.filesystems import FileSystems

    assert media.uri is not None and media.offset is not None and media.size is not None
    try:
        with FileSystems.open(media.uri, mime_type="application/octet-stream", compression_type="uncompressed") as f:
            f.seek(media.offset)
            data = f.read(media.size)
    except Exception as e:  # removed or unreadable since it was listed
        raise CleanError("file.unreadable", f"{media.describe()} in {media.uri}: {type(e).__name__}: {e}") from e
    if len(data) != media.size:
        raise CleanError("file.unreadable", f"{media.describe()} in {media.uri}: {len(data)} of its {media.size} "
                         "bytes are there now; the file was cut short or replaced while the job ran")
    return data


def _read_uri(uri: str, max_bytes: int) -> bytes:
    from apache_beam.io.filesystems import FileSystems

    check_regular(uri)
    try:
        with FileSystems.open(uri, mime_type="application/octet-stream", compression_type="uncompressed") as f:
            data = f.read(max_bytes + 1)
    except Exception as e:  # Beam wraps local errors in BeamIOError / IOError subclasses
        text = str(e)
        if isinstance(e, FileNotFoundError) or "No such file" in text or "not found" in text.lower():
            if other := _other_form_of(uri):
                return _read_uri(other, max_bytes)
            raise CleanError("file.missing", f"{uri} does not exist") from e
        if "Is a directory" in text:
            raise CleanError("file.unreadable", f"{uri} is a directory") from e
        raise CleanError("file.unreadable", f"{uri}: {type(e).__name__}: {text}") from e
    return data


def _other_form_of(uri: str) -> str | None:
    from pipelines.readers.common import local_path

    path = local_path(uri)
    return other_form(path) if path is not None else None


def other_form(path: str) -> str | None:
    """The local file named ``path`` in the other Unicode normalization form, where ``path`` names none:
    files made on macOS keep decomposed names (NFD: ``e`` + U+0301) when they are copied elsewhere,
    while a manifest written by other tools holds composed ones (NFC: U+00E9), and the two differ as
    bytes. Only non-ASCII paths have two forms; the whole path is tried in each."""
    if path.isascii():
        return None
    for form in ("NFC", "NFD"):
        other = unicodedata.normalize(form, path)
        if other != path and os.path.isfile(other):
            return other
    return None
