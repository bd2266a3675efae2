"""Reading WebDataset shards as raw samples ({"__key__", "json": bytes, "text.npy": bytes, ...}).

Plain tars are read by a small header parser (``tarfile`` builds a ``TarInfo`` with every field
decoded for each header, which costs more than the copy of the data); compressed tars go through
``tarfile``. Both refuse damage and truncation the same way.

With ``lazy``, the ``.npy`` members of a plain tar are not read during the scan: the sample holds a
``MemberRef`` whose ``read`` fetches the bytes later. DataLoader workers scan every shard to agree on
the sample order but decode only the batches they own, so each reads only its own arrays.
"""

from __future__ import annotations

import os
import re
import tarfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

from webdataset.tariterators import base_plus_ext

from mbm.data.errors import SkipLog

_BLOCK = tarfile.BLOCKSIZE
_ZEROS = bytes(_BLOCK)
COMPRESSED = (b"\x1f\x8b\x08", b"BZh", b"\x5d\x00\x00\x80", b"\xfd7zXZ")  # what tarfile's "r|*" detects
_REGULAR = (b"0", b"\0", b"7")
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, dirs, fifos: tarfile reads no data for them
_PAX = (b"x", b"g", b"X")
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")


class MemberRef:
    """A member's data left in its shard at ``offset``; ``read`` fetches it (``ValueError`` when the shard
    has changed since the scan, ``OSError`` when it cannot be read)."""

    __slots__ = ("shard", "offset", "size")

    def __init__(self, shard: ShardFile, offset: int, size: int) -> None:
        self.shard, self.offset, self.size = shard, offset, size

    def read(self) -> bytes:
        data = _OPEN.pread(self.shard, self.size, self.offset)
        if len(data) < self.size:
            raise ValueError(f"{self.shard.path}: member at byte {self.offset} cut short since the scan")
        return data

    def read_prefix(self, size: int) -> bytes:
        """The member's first ``size`` bytes (fewer where the member or the file is shorter)."""
        return _OPEN.pread(self.shard, min(size, self.size), self.offset)

    def read_into(self, buffer: memoryview, start: int) -> int:
        """The member's bytes from ``start`` into ``buffer`` (at most to the member's end); bytes read."""
        return _OPEN.preadv(self.shard, buffer[: max(0, self.size - start)], self.offset + start)


class ShardFile:
    """A shard as it was scanned: its path and the (device, inode, size, mtime) that identify that file."""

    __slots__ = ("path", "identity")

    def __init__(self, path: str, stat: os.stat_result) -> None:
        self.path, self.identity = path, file_identity(stat)


def file_identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime): a file that changed no longer has the same."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


class _OpenShards:
    """Read-only descriptors of the shards members are read from, the ``limit`` most recently used kept
    open (samples of a few shards at a time sit in the shuffle buffer). Reads hold a lock, so a
    descriptor is never closed under a read on another thread."""

    def __init__(self, limit: int = 32) -> None:
        self.limit = limit
        self.fds: OrderedDict[str, tuple[int, tuple[int, int, int, int]]] = OrderedDict()
        self.lock = threading.Lock()

    def reset_lock(self) -> None:
        """A forked child's fresh lock (the parent's may have been held by another thread at the fork)."""
        self.lock = threading.Lock()

    def pread(self, shard: ShardFile, size: int, offset: int) -> bytes:
        with self.lock:
            return os.pread(self.fd(shard), size, offset)

    def preadv(self, shard: ShardFile, buffer: memoryview, offset: int) -> int:
        """Read into ``buffer`` from ``offset`` until it is full or the file ends; bytes read."""
        done = 0
        with self.lock:
            fd = self.fd(shard)
            while done < len(buffer):
                got = os.preadv(fd, [buffer[done:]], offset + done)
                if got == 0:
                    break
                done += got
        return done

    def fd(self, shard: ShardFile) -> int:
        entry = self.fds.get(shard.path)
        if entry is not None and entry[1] == shard.identity:
            self.fds.move_to_end(shard.path)
            return entry[0]
        if entry is not None:
            self._close(shard.path)
        fd = os.open(shard.path, os.O_RDONLY | os.O_CLOEXEC)
        identity = file_identity(os.fstat(fd))
        if identity != shard.identity:
            os.close(fd)
            raise ValueError(f"{shard.path} changed since it was scanned")
        self.fds[shard.path] = (fd, identity)
        while len(self.fds) > self.limit:
            self._close(next(iter(self.fds)))
        return fd

    def _close(self, path: str) -> None:
        os.close(self.fds.pop(path)[0])


_OPEN = _OpenShards()
os.register_at_fork(after_in_child=_OPEN.reset_lock)


def read_member(data: bytes | MemberRef) -> bytes:
    return data.read() if isinstance(data, MemberRef) else data


def iter_tar(path: str, *, lazy: bool = False) -> Iterator[dict[str, Any]]:
    """Samples of one tar in file order; raises on a corrupt or truncated tar (the partial sample is lost).

    ``lazy``: ``.npy`` members of a plain tar come as ``MemberRef`` instead of bytes.
    """
    with open(path, "rb") as f:
        if f.peek(6).startswith(COMPRESSED):
            members = _tarfile_members(f)
        else:
            members = _members(f, ShardFile(path, os.fstat(f.fileno())) if lazy else None)
        current: dict[str, Any] | None = None
        for name, data in members:
            key, ext = _key_ext(name)
            if key is None or ext is None or name.startswith("__"):
                continue
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": path}
            current[ext.lower()] = data
        if current is not None:
            yield current


def _key_ext(name: str) -> tuple[str | None, str | None]:
    """webdataset's ``base_plus_ext``: (the name up to the first dot of its last part, the rest); the
    string operations where they give its answer (a name whose last part has a dot after its first
    character), its regular expression otherwise."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot > slash:
        return name[:dot], name[dot + 1:]
    return base_plus_ext(name)


_AHEAD = 4 * _BLOCK  # bytes read with each header: the data of a small member (a json doc) comes with it


def _members(f: BinaryIO, shard: ShardFile | None = None) -> Iterator[tuple[str, bytes | MemberRef]]:
    """(name, data) of the regular members of an uncompressed tar, as ``tarfile`` would name them; with a
    ``shard``, the data of ``.npy`` members is a ``MemberRef`` and the scan skips over it.

    Each header is read at its offset with one ``pread`` that also brings the next ``_AHEAD`` bytes, so a
    small member's data comes with its header and a skipped member costs no seek."""
    fd = f.fileno()
    pax: dict[str, str] = {}
    shared: dict[str, str] = {}  # global pax headers
    long_name: str | None = None
    first = True
    offset = 0  # of the next header
    while True:
        chunk = os.pread(fd, _BLOCK + _AHEAD, offset)
        block = chunk[:_BLOCK]
        offset += _BLOCK
        if len(block) < _BLOCK:
            raise tarfile.ReadError("empty file" if first and not block else "unexpected end of data: truncated")
        if block == _ZEROS:
            tail = chunk[_BLOCK:2 * _BLOCK]
            if tail != _ZEROS:  # tarfile reads this as the end; the second zero block says the file is whole
                raise tarfile.ReadError("no end-of-archive marker: truncated")
            return
        _check_sum(block)
        first = False
        kind = block[156:157]
        size = _number(block[124:136])
        if kind in _PAX or kind in (b"L", b"K"):
            data = _data(fd, chunk, offset, size)
            offset += _padded(size)
            if kind == b"g":
                shared.update(_pax_records(data))
            elif kind in _PAX:
                pax.update(_pax_records(data))
            elif kind == b"L":
                long_name = _text(data.split(b"\0", 1)[0])
            continue
        headers = {**shared, **pax} if shared else pax
        if kind == b"S" or any(k.startswith("GNU.sparse") for k in headers):
            raise tarfile.ReadError("sparse members are not supported")
        if "size" in headers:
            size = int(headers["size"])
        name = _name(block, headers, long_name)
        pax, long_name = {}, None
        if kind == b"\0" and block[:100].split(b"\0", 1)[0].endswith(b"/"):
            kind = b"5"  # old tars write a directory as a regular file whose name ends in a slash
        if kind in _REGULAR and shard is not None and name.endswith(".npy"):
            # A member cut short shows at the next header: the scan reads past the end of the file.
            yield name, MemberRef(shard, offset, size)
        elif kind in _REGULAR:
            yield name, _data(fd, chunk, offset, size)
        if kind not in _NO_DATA:
            offset += _padded(size)


def _data(fd: int, chunk: bytes, offset: int, size: int) -> bytes:
    """``size`` bytes of member data at ``offset``: from ``chunk`` (its header and what followed it) when it
    holds them, else read."""
    if size <= len(chunk) - _BLOCK:
        return chunk[_BLOCK:_BLOCK + size]
    data = os.pread(fd, size, offset)
    if len(data) < size:
        raise tarfile.ReadError("unexpected end of data: truncated")
    return data


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _number(field: bytes) -> int:
    if field[0] == 0o200:  # GNU base-256
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise tarfile.ReadError("invalid header") from None


def _byte_sum(block: bytes) -> int:
    """The sum of a 512-byte block's bytes, 10x faster than ``sum``: adler32's low half is 1 + the
    sum modulo 65521, which is exact for 256 bytes (at most 65280)."""
    return (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2


def _check_sum(block: bytes) -> None:
    """The header checksum, as unsigned or (some old tars) signed bytes; the field itself counts as spaces."""
    stored = _number(block[148:156])
    unsigned = 256 + _byte_sum(block) - sum(block[148:156])
    if stored != unsigned and stored != unsigned - 256 * sum(b >= 128 for b in block[:148] + block[156:]):
        raise tarfile.ReadError("bad checksum")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _name(block: bytes, headers: dict[str, str], long_name: str | None) -> str:
    """A pax path, else a GNU long name, else the header's (ustar prefix + name)."""
    if "path" in headers:
        return headers["path"].rstrip("/")
    if long_name is not None:
        return long_name
    name = _text(block[:100].split(b"\0", 1)[0])
    if not block[345]:  # no ustar prefix (nearly every name)
        return name
    prefix = _text(block[345:500].split(b"\0", 1)[0])
    return prefix + "/" + name if prefix else name


def _pax_records(data: bytes) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records (length, keyword, value) of a pax header."""
    out, pos = {}, 0
    while (match := _PAX_RECORD.match(data, pos)) is not None:
        length = int(match[1])
        if length == 0:
            raise tarfile.ReadError("invalid pax header")
        out[_text(match[2])] = _text(data[match.end(2) + 1:match.start(1) + length - 1])
        pos += length
    return out


def _tarfile_members(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular members, read by ``tarfile`` (compressed tars)."""
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            if info.isreg():
                yield info.name, tar.extractfile(info).read()
        _check_end(f, tar)


def _check_end(f: BinaryIO, tar: tarfile.TarFile) -> None:
    """Refuse a tar cut at a member boundary: tarfile reads it as complete, but the end-of-archive blocks are gone."""
    if getattr(tar.fileobj, "comptype", "tar") != "tar":
        return  # compressed: offsets are not file positions, and gzip/bz2 detect truncation themselves
    f.seek(tar.offset)
    tail = f.read(2 * _BLOCK)
    if len(tail) < 2 * _BLOCK or tail.strip(b"\0"):
        raise tarfile.ReadError(f"no end-of-archive marker after offset {tar.offset}: truncated")


def read_shards(paths: Iterable[str], skips: SkipLog, *, lazy: bool = False) -> Iterator[dict[str, Any]]:
    """Raw samples of the given shards in order; a corrupt shard yields what precedes the damage, then is skipped."""
    for path in paths:
        try:
            yield from iter_tar(path, lazy=lazy)
        except Exception as exn:  # noqa: BLE001 - any failure to read a shard is a data error, not ours
            skips.skip("shard.corrupt", f"{path}: {type(exn).__name__}: {exn}")
