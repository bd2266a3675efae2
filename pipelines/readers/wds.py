"""WebDataset tar reader (img2dataset layout): ``{key}.jpg``, ``{key}.txt``, ``{key}.json``, ``{key}.cls``.

Members are grouped into samples the way ``webdataset`` does: by the part of the name before the first
dot of the base name; a sample's members need not follow each other (``_joined``), as webdataset's must. Hard links and symlinks to members read as their targets,
as ``tarfile.extractfile`` reads them; a sample with a link to nothing is one ``read.unreadable`` reject.
Concatenated tars (``cat a.tar b.tar``, ``cat a.tar.gz b.tar.gz``) are read to their end, like
``tar --ignore-zeros``. A tar damaged part-way (a compressed one cut short too) keeps the samples before
the damage and yields one ``read.corrupt_tar`` reject. A file that is neither named nor made like a tar
(the ``.parquet`` and ``_stats.json`` img2dataset writes beside its tars, matched by ``dir/*``; a
``captions.jsonl.gz``, compressed but no tar inside) is one ``read.not_a_tar`` reject.

A member whose extension has dots (``p.en.txt``: key ``p``, extension ``en.txt``) stands in for a text,
image or audio member the sample lacks (or has empty) when its extension ends in one; see ``_stand_ins``.
Members that are not read (a second image, a dotted one, a second member of
an extension the sample has: ``a.JPG`` beside ``a.jpg``) are listed in the sample's meta. A json member
that cannot be used (not JSON, not an object, a caption that is not a string) is a reject of its own,
and its sample is read without it, as beside a folder's image.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from pipelines.errors import CleanError
from pipelines.readers.common import (
    AUDIO_EXTS,
    IMAGE_EXTS,
    FirstWins,
    absolute,
    display_name,
    is_empty,
    local_path,
    media_kind,
    normalize_id,
    reject,
    shown,
)
from pipelines.readers.rows import decompressed, load_json, meta_value
from schemas import Media, RawSample, Reject

if TYPE_CHECKING:
    from pipelines.readers.source import SourceConfig

TEXT_SUFFIXES = ("txt", "text")
LABEL_SUFFIXES = ("cls", "label")
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_SKIP = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta (__index__ and the like)
_INT = re.compile(r"^[+-]?\d+$")
JSON_FIELDS = ("key", "caption", "label")  # fields of a sample's json that are its id, text and label
UNREAD_MEMBERS = "unread_members"  # meta key: the members that hold bytes and were not used
# starts a group's key for a member whose extension the sample already has (no member name holds a NUL)
_REPEAT = "\0"
# names of tars, plain or compressed; a file named otherwise is read only when it starts like one
# bytes of members held to join a sample's members that other samples' came between (``_joined``)
JOIN_BYTES = 64 << 20
JOIN_SAMPLES = 100_000  # and samples held (~1 KB each where their media stay in the tar)
TAR_NAMES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tbz2", ".tar.xz", ".txz", ".tar.lzma",
             ".tar.zst", ".tzst")


@dataclass(frozen=True)
class _Range:
    """An image or audio member's data left where it is in an uncompressed local tar: the sample's
    ``Media`` points there and the cleaner reads it, so media bytes never travel through the job's
    shuffles (which the local runner holds in memory: a dataset's worth of them)."""

    path: str
    offset: int
    size: int

    def __bool__(self) -> bool:  # "has bytes", as a member's non-empty bytes are
        return self.size > 0


@dataclass(frozen=True)
class _Damage:
    member: str | None  # the member whose data was cut short; None when a header was unreadable
    offset: int
    error: str
    opened: bool = True


def iter_tar(
    path: str, config: SourceConfig | None = None, *, name: str | None = None, split: str | None = None
) -> Iterator[RawSample | Reject]:
    """Samples and rejects of one tar (plain or compressed), in member order; the first of one id wins.
    ``split``: the split the tar's path names, recorded in the meta of each sample whose json names none."""
    name = name or display_name(path)
    seen = FirstWins()
    for key, group in _joined(_groups(absolute(path), name), name):
        if isinstance(group, Reject):
            yield group
            continue
        for item in _read(key, group, name):
            if isinstance(item, Reject):
                yield item
                continue
            if split is not None and "split" not in item.meta:
                item.meta["split"] = split
            yield seen.check(item.id, item.source) or item


def _read(key: str, group: dict[str, tuple[str, bytes | CleanError]], name: str) -> Iterator[RawSample | Reject]:
    """The sample of one key, or its reject; before it, the reject of a json member that cannot be used
    when the sample has other members (it is then read without the json, its id the tar key)."""
    source = f"{name}:{key}"
    try:
        _check_readable(group, source)
    except CleanError as e:
        yield reject(e.reason, e.detail, source, key)
        return
    stand_ins = _stand_ins(group)
    members = {**group, **stand_ins}
    text = _member(members, TEXT_SUFFIXES)
    label = _member(group, LABEL_SUFFIXES)
    info: dict[str, Any] = {}
    used_text, used_label, meta = text and text[1], _label(label and label[1]), {}
    used = {member for member, _ in filter(None, (text, label))}
    if "json" in group:
        member = group["json"][0]
        used.add(member)  # read, or a reject of its own
        try:
            info = json_object(group["json"][1], f"{name}:{member}")
            used_text, used_label, meta = with_json(info, used_text, used_label, f"{name}:{member}")
        except CleanError as e:
            if len(group) == 1:  # the sample is its json alone
                yield reject(e.reason, e.detail, source, key)
                return
            yield _bad_json(name, member, key, e)
            info = {}
    sample_id = _sample_id(info, key, source)
    image = _media(members, IMAGE_EXTS)
    audio = _media(members, AUDIO_EXTS)
    used |= {media.name for media in (image, audio) if media is not None}
    unread = sorted(member for suffix, (member, data) in group.items()
                    if (member not in used or suffix.startswith(_REPEAT)) and data)
    if used_text is None and image is None and audio is None:
        yield reject("read.no_modality", f"{source}: {_nothing(info, group, unread)}", source, sample_id)
        return
    if unread:
        meta[UNREAD_MEMBERS] = unread
    yield RawSample(id=sample_id, text=used_text, image=image, audio=audio, label=used_label, meta=meta,
                    source=source)


def _bad_json(name: str, member: str, key: str, error: CleanError) -> Reject:
    """The reject of a json member that cannot be used; its sample is read without it."""
    detail = (f"{error.detail}; the other members of sample {key!r} are read without it: fix the json, or "
              "remove it")
    return reject(error.reason, detail, f"{name}:{member}", member)


def _groups(path: str, name: str) -> Iterator[tuple[str, dict[str, tuple[str, bytes | CleanError]] | Reject]]:
    """``(key, {suffix: (member, bytes)})`` per sample; ``(key, Reject)`` once when the tar is damaged, or
    when the file is not a tar."""
    key, group, previous, repeats = "", {}, set(), 0
    for item in _members(path, name):
        if isinstance(item, Reject):  # not a tar at all
            yield "", item
            return
        if isinstance(item, _Damage):
            if group and _complete(group, previous, item, key):
                yield key, group
                group = {}
            yield "", _damage_reject(name, item, key if group else None)
            return
        member, data = item
        match = _KEY.match(member)
        if match is None:
            continue  # no extension: webdataset skips it too
        prefix, suffix = match.group(1), match.group(2).lower()
        if prefix != key:
            if group:
                yield key, group
                previous = set(group)
            key, group = prefix, {}
        if suffix in group:  # a second a.jpg (a.JPG, or a.jpg again, as tar -r adds it): kept, not read
            repeats += 1
            suffix = f"{_REPEAT}{repeats}"
        group[suffix] = (member, data)
    if group:
        yield key, group


def _joined(groups: Iterable[tuple[str, dict[str, tuple[str, bytes | CleanError]] | Reject]], name: str,
            budget: int = JOIN_BYTES) -> Iterator[tuple[str, dict[str, tuple[str, bytes | CleanError]] | Reject]]:
    """``groups`` with a key's members joined where other samples' members came between them: a tar
    written in directory order (``tar cf x.tar -C dir .`` lists a folder's files in no set order) or one
    file kind after another (``tar cf x.tar *.jpg *.txt``). webdataset itself reads such a tar as two
    samples per key, each with part of the members.

    Groups are held, in the order their keys first came, until the bytes they hold pass ``budget``
    (an uncompressed local tar's media stay in the tar and count nothing here) or they number more than
    ``JOIN_SAMPLES``; the oldest then go on.
    A later group of a key already gone on is a ``read.split_sample`` reject saying how to write the tar;
    one holding a kind of member its key's first group has too (``x.jpg`` twice) is a sample of its own,
    which ``iter_tar`` rejects as a duplicate id, as before."""
    held: deque[tuple[str, dict[str, Any]]] = deque()
    open_keys: dict[str, dict[str, Any]] = {}  # key -> its held group, which a later one may join
    gone: dict[str, frozenset[str]] = {}  # key -> the member kinds of its group that went on
    kinds: dict[frozenset[str], frozenset[str]] = {}  # one set per combination of kinds, shared by the keys
    size = 0
    for key, group in groups:
        if isinstance(group, Reject):  # the end of what can be read
            yield from held
            yield key, group
            return
        first = open_keys.get(key)
        if first is not None and not first.keys() & group.keys():
            first.update(group)
        elif key in gone and not gone[key] & group.keys():
            yield "", _split_reject(name, key, group, budget)
            continue
        else:
            held.append((key, group))
            open_keys[key] = group
        size += _bytes_held(group)
        while held and (size > budget or len(held) > JOIN_SAMPLES):
            out_key, out = held.popleft()
            if open_keys.get(out_key) is out:
                del open_keys[out_key]
                gone[out_key] = kinds.setdefault(frozenset(out), frozenset(out))
            size -= _bytes_held(out)
            yield out_key, out
    yield from held


def _bytes_held(group: dict[str, tuple[str, Any]]) -> int:
    """Bytes a group holds in memory (a ``_Range`` of a local tar's media holds none)."""
    return sum(len(data) for _, data in group.values() if isinstance(data, bytes))


def _split_reject(name: str, key: str, group: dict[str, tuple[str, Any]], budget: int) -> Reject:
    members = sorted(member for member, _ in group.values())
    held = f"{budget >> 20} MB" if budget >= 1 << 20 else f"{budget} bytes"
    return reject(
        "read.split_sample",
        f"{name}: {_some(members)} of sample {key!r} come{'s' if len(members) == 1 else ''} "
        f"after more than {held} (or {JOIN_SAMPLES:,} samples) of other samples' members, so the sample was read without "
        f"{'it' if len(members) == 1 else 'them'}: write the tar with each sample's files together (GNU tar: "
        "tar --sort=name -cf x.tar -C folder .), or uncompressed (a local .tar's media count nothing here)",
        f"{name}:{members[0]}", key)


def _complete(group: dict[str, Any], previous: set[str], damage: _Damage, key: str) -> bool:
    """Whether the sample being read when the damage came is whole. The damage names its member: whole
    unless that member is the sample's own (a later sample's header was read, so this one had ended).
    It does not (a cut header): whole when it has the members the sample before it had."""
    cut = _KEY.match(damage.member or "")
    if cut:
        return cut.group(1) != key
    return set(group) >= previous


def _damage_reject(name: str, damage: _Damage, dropped_key: str | None) -> Reject:
    where = damage.member if damage.member is not None else str(damage.offset)
    if not damage.opened:
        detail = f"{name} cannot be opened ({damage.error}); none of its samples are read"
    else:
        at = f"member {damage.member!r}" if damage.member is not None else f"byte {damage.offset}"
        detail = (
            f"{name} is damaged at {at} ({damage.error}); the samples before it are kept, the rest is lost"
        )
    if dropped_key is not None:
        detail += f", including the incomplete sample {dropped_key!r}"
    return reject("read.corrupt_tar", detail, f"{name}:{where}")


def _members(path: str, name: str) -> Iterator[tuple[str, bytes | CleanError] | _Damage | Reject]:
    """``(member name, bytes)`` of the regular files and links of a tar, then a ``_Damage`` if it ends
    badly; a link whose target cannot be read comes with the ``CleanError`` saying why. A file that is
    not a tar is one ``Reject``."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    from pipelines.media import check_regular

    try:
        check_regular(path)  # a named pipe would block the worker
        f = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    except Exception as e:  # missing, no permission, ...: Beam wraps them in several types
        yield _Damage(None, 0, f"{type(e).__name__}: {e}", opened=False)
        return
    with f, _Links(path) as links:
        member, offset = None, 0
        try:
            kind = _compression(f)
            if not _tar_like(path, f, kind):
                yield _not_a_tar(name, kind)
                return
            # Media members of an uncompressed local tar stay in it (``_Range``); a compressed tar cannot
            # be read at an offset, and a remote one would cost a request per member: their bytes are read.
            local = local_path(path) if kind == CompressionTypes.UNCOMPRESSED else None
            length = os.fstat(f.fileno()).st_size if local is not None and hasattr(f, "fileno") else -1
            with decompressed(f, kind) as tar:
                source = tar if kind == CompressionTypes.UNCOMPRESSED else _UpToTheCut(tar)
                # streamed; ignore_zeros reads on past the end marker of each part
                # an uncompressed local tar is read with seeks over the data of the members left in it
                mode = "r:" if local is not None else "r|"
                stream = tarfile.open(fileobj=source, mode=mode, tarinfo=_TarInfo, ignore_zeros=True)
                while (info := stream.next()) is not None:
                    offset = stream.offset
                    stream.members = []  # a streamed tar otherwise keeps every TarInfo
                    if _SKIP.match(info.name):
                        continue
                    if info.isreg():
                        member = info.name
                        if (local is not None and info.size and not info.issparse() and media_kind(member)
                                and info.offset_data + info.size <= length):
                            yield member, _Range(local, info.offset_data, info.size)
                        else:  # whole, or cut short: reading it raises, and the damage names it
                            yield member, stream.extractfile(info).read()
                        member = None
                    elif (info.islnk() or info.issym()) and _KEY.match(info.name):
                        yield info.name, links.read(info)
        except _HeaderDamage as e:
            yield _Damage(None, e.offset, str(e))
        except Exception as e:  # tarfile.ReadError, EOFError, zlib.error, OSError: all mean damage
            yield _Damage(member, offset, f"{type(e).__name__}: {e}")


def _compression(f: BinaryIO) -> str:
    """The compression of the tar in ``f`` by its magic number (tarfile's ``r|*`` set, and zstd). The tar
    is then read through ``decompressed``, not tarfile's own decompression, which stops quietly after
    the first part of ``cat a.tar.gz b.tar.gz`` (or of concatenated bzip2 or xz streams) and loses the
    rest: so it is read whole, like ``tar -xzf --ignore-zeros``."""
    from apache_beam.io.filesystem import CompressionTypes

    magic = {
        b"\x1f\x8b\x08": CompressionTypes.GZIP,
        b"BZh": CompressionTypes.BZIP2,
        b"\x5d\x00\x00\x80": CompressionTypes.LZMA,
        b"\xfd7zXZ": CompressionTypes.LZMA,
        b"\x28\xb5\x2f\xfd": CompressionTypes.ZSTD,  # .tar.zst, which tarfile itself does not read
    }
    head = f.read(6)
    f.seek(0)
    found = (kind for start, kind in magic.items() if head.startswith(start))
    return next(found, CompressionTypes.UNCOMPRESSED)


def _tar_like(path: str, f: BinaryIO, kind: str) -> bool:
    """Whether a file is named like a tar or starts, once decompressed, with a tar header (checksum and
    all) or an end-of-archive block; only its first block is decompressed, and ``f`` is left at its
    start."""
    if path.lower().endswith(TAR_NAMES):
        return True
    with decompressed(f, kind) as data:
        head = data.read(tarfile.BLOCKSIZE)
    f.seek(0)
    if len(head) == tarfile.BLOCKSIZE and not head.strip(tarfile.NUL):
        return True  # an empty tar
    try:
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _not_a_tar(name: str, kind: str) -> Reject:
    from apache_beam.io.filesystem import CompressionTypes

    if kind == CompressionTypes.UNCOMPRESSED:
        what = "it does not start like a tar or a compressed tar"
    else:
        what = f"it is {kind}-compressed data, but what it holds does not start like a tar"
    detail = (
        f"{name} is not a WebDataset tar (its name does not end in .tar, .tar.gz, ... and {what}), yet "
        "`shards` matched it; give `shards` a pattern that matches the tars only (\"dir/*.tar\"), or the "
        'folder itself (shards = "dir" reads its *.tar files)'
    )
    return reject("read.not_a_tar", detail, name)


class _UpToTheCut:
    """A decompressing file for tarfile's streamed reader, read through ``read1``, which hands over all
    that was decompressed before a cut and raises only at the next call. The file's own ``read`` (tarfile
    asks for 10 KiB at a time) raises at a cut without handing over what it had: the whole members in
    that last part would be lost."""

    def __init__(self, tar: BinaryIO) -> None:
        self.read = tar.read1


class _HeaderDamage(Exception):
    """A cut or garbled header at ``offset``."""

    def __init__(self, offset: int, error: tarfile.HeaderError) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.offset = offset


class _TarInfo(tarfile.TarInfo):
    """Raises ``_HeaderDamage`` at a cut or garbled header, where ``tarfile`` would end iteration
    without an error (or, with ``ignore_zeros``, skip the block and read on from garbage). Zero blocks
    are end-of-archive markers that ``ignore_zeros`` reads past; the end of the file after one is the
    proper end, and so is a last zero block cut short (nothing is lost)."""

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        if 0 < len(buf) < tarfile.BLOCKSIZE and not buf.strip(tarfile.NUL):
            raise tarfile.EOFHeaderError("end of file header")
        return super().frombuf(buf, encoding, errors)

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            info = super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            tf.mbm_after_zeros = True  # type: ignore[attr-defined]
            raise
        except tarfile.EmptyHeaderError as e:
            if getattr(tf, "mbm_after_zeros", False):
                raise
            raise _HeaderDamage(tf.offset, e) from e
        except tarfile.HeaderError as e:
            raise _HeaderDamage(tf.offset, e) from e
        tf.mbm_after_zeros = False  # type: ignore[attr-defined]
        return info


class _Links:
    """Reads the targets of link members, which a streamed tar cannot (it never seeks back, and a
    symlink may point ahead). On the first link a second, seekable handle on the tar lists its members
    once; a link is then followed the way ``tarfile.extractfile`` follows it: a hard link to the last
    member of that name before it, a symlink to the last member of that name in the archive, relative
    to the link's folder; links to links are followed in turn. Each link read from a compressed tar
    decompresses it again up to the target."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._stack = contextlib.ExitStack()
        self._archive: tarfile.TarFile | None = None
        self._by_name: dict[str, list[tarfile.TarInfo]] | None = None
        self._cut = ""  # why the listing stopped early, when it did

    def __enter__(self) -> _Links:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def read(self, link: tarfile.TarInfo) -> bytes | CleanError:
        """The bytes ``link`` leads to, or the ``read.unreadable`` error saying why there are none."""
        try:
            target = self._follow(link)
            data = self._archive.extractfile(target) if self._archive else None
            if data is None:  # a directory, a device
                return CleanError("read.unreadable", f"{_described(link)}, which is not a file")
            return data.read()
        except CleanError as e:
            return e
        except Exception as e:  # the target's data is cut short: the streamed pass reports the tar too
            return CleanError("read.unreadable", f"{_described(link)}, unreadable ({type(e).__name__}: {e})")

    def _follow(self, link: tarfile.TarInfo) -> tarfile.TarInfo:
        member, seen = link, set()
        while member.islnk() or member.issym():
            if member.offset in seen:
                raise CleanError("read.unreadable", f"{_described(link)}, which leads back to itself")
            seen.add(member.offset)
            member = self._target(member, link)
        return member

    def _target(self, member: tarfile.TarInfo, link: tarfile.TarInfo) -> tarfile.TarInfo:
        if member.issym():
            name, before = "/".join(filter(None, (posixpath.dirname(member.name), member.linkname))), None
        else:
            name, before = member.linkname, member.offset
        named = self._members().get(posixpath.normpath(name), [])
        found = [m for m in named if before is None or m.offset < before]
        if not found:
            raise CleanError("read.unreadable", f"{_described(link)}, which is not in the tar{self._cut}")
        return found[-1]

    def _members(self) -> dict[str, list[tarfile.TarInfo]]:
        """The tar's members by normalized name, in order; listed on first use."""
        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems

        if self._by_name is None:
            self._by_name = {}
            try:
                f = self._stack.enter_context(
                    FileSystems.open(self._path, compression_type=CompressionTypes.UNCOMPRESSED)
                )
                tar = self._stack.enter_context(decompressed(f, _compression(f)))  # as the streamed pass
                self._archive = self._stack.enter_context(
                    tarfile.open(fileobj=tar, mode="r:", tarinfo=_TarInfo, ignore_zeros=True)
                )
                for member in iter(self._archive.next, None):
                    self._by_name.setdefault(posixpath.normpath(member.name), []).append(member)
            except Exception as e:  # damage, which the streamed pass reports: members past it are not found
                self._cut = f" (the tar is damaged before its end: {type(e).__name__}: {e})"
        return self._by_name


def _described(link: tarfile.TarInfo) -> str:
    kind = "a symlink" if link.issym() else "a hard link"
    return f"member {link.name!r} is {kind} to {link.linkname!r}"


def _sample_id(info: dict[str, Any], key: str, source: str) -> str:
    """json ``key`` when it is a usable id (img2dataset writes one), else the tar key."""
    if is_empty(info.get("key")):
        return key
    try:
        return normalize_id(info["key"], source)
    except CleanError:
        return key


def _nothing(info: dict[str, Any], group: dict[str, tuple[str, bytes | CleanError]], unread: list[str]) -> str:
    """Why a sample has no text, image or audio."""
    what = _dotted_keys(group, unread) or "no text, image or audio member"
    status = info.get("status")
    if isinstance(status, str) and status != "success":  # img2dataset keeps the json of a failed download
        what += f"; the json says status {status!r}"
        if isinstance(info.get("error_message"), str) and info["error_message"]:
            what += f": {info['error_message']}"
    return what


def with_json(info: dict[str, Any], text: Any, label: Any, source: str) -> tuple[Any, Any, dict[str, Any]]:
    """The text, label and meta of a sample whose json is ``info``: its ``caption`` stands in for a
    missing text, its ``label`` for a missing label, and its other fields but ``key`` (the id) are meta;
    so are a caption and a label not used, as a manifest keeps an unused caption, unless they say what
    the text or label already says (img2dataset writes the caption to the json and the .txt). A caption
    used as the text that is not a string raises ``read.bad_type``."""
    if text is None:
        text = _caption(info.get("caption"), source)
    if label is None and not is_empty(info.get("label")):
        label = meta_value(info["label"])
    said = {"key": None, "caption": text, "label": label}
    return text, label, {
        k: meta_value(v) for k, v in info.items()
        if k not in JSON_FIELDS or not (k == "key" or is_empty(v) or _same(v, said[k]))
    }


def _same(value: Any, used: Any) -> bool:
    """Whether a json field says what the sample's text or label (``used``) says."""
    if used is None:
        return False
    if isinstance(used, bytes):
        used = used.decode("utf-8", errors="surrogateescape")
    return value == used or (isinstance(value, (str, int)) and str(value).strip() == str(used).strip())


def _stand_ins(group: dict[str, tuple[str, bytes]]) -> dict[str, tuple[str, bytes]]:
    """Members with dotted extensions used for a modality the sample has no member with bytes for
    (``p.jpg`` + ``p.en.txt``: the text is ``p.en.txt``; an empty ``p.txt`` does not hide it), by the
    last part of their extension. A modality that has a plain member with bytes keeps it. One candidate
    is used; of several (``p.en.txt``, ``p.de.txt``), the first in name order, unless every member of the
    sample is dotted: then they are most likely several files under one key (``photo.2019.01.jpg``,
    ``photo.2019.02.jpg``) and none is used. Those not used are listed in meta by the caller."""
    plain = any("." not in suffix and not suffix.startswith(_REPEAT) for suffix in group)
    used: dict[str, tuple[str, bytes]] = {}
    for suffixes in (TEXT_SUFFIXES, IMAGE_EXTS, AUDIO_EXTS):
        if any(suffix in suffixes and data for suffix, (_, data) in group.items()):
            continue
        candidates = sorted(
            (suffix for suffix in group if "." in suffix and suffix.rsplit(".", 1)[1] in suffixes),
            key=lambda suffix: group[suffix][0],
        )
        if len(candidates) == 1 or (candidates and plain):
            used[candidates[0].rsplit(".", 1)[1]] = group[candidates[0]]
    return used


def _dotted_keys(group: dict[str, tuple[str, bytes | CleanError]], unread: list[str]) -> str:
    """Why the unread members whose key has dots (``photo.2019.01.jpg``) gave no modality, and what to
    do; "" when none has. The key ends at the first dot of the base name, as in webdataset, so the
    extension of ``photo.2019.01.jpg`` is ``2019.01.jpg``; when every member of a sample is dotted and
    several would stand in for one modality, none is used (see ``_stand_ins``)."""
    known = (*TEXT_SUFFIXES, *IMAGE_EXTS, *AUDIO_EXTS)
    dotted = [(member, suffix) for suffix, (member, _) in group.items()
              if member in unread and "." in suffix and suffix.rsplit(".", 1)[1] in known]
    if not dotted:
        return ""
    first = dotted[0][0]
    match = _KEY.match(first)
    stem, _, ext = posixpath.basename(first).rpartition(".")
    return (
        f"a WebDataset key ends at the first dot of a file name, so {_some(m for m, _ in dotted)} were "
        f"read as one sample, key {match.group(1) if match else first!r}, with extensions "
        f"{_some(x for _, x in dotted)}: most likely several files under one key, so none was used as its "
        f"text, image or audio; rename the files without dots in the key ({stem.replace('.', '_')}.{ext}, "
        f"not {posixpath.basename(first)})"
    )


def _some(items: Iterable[str], at_most: int = 4) -> str:
    """``items`` quoted and comma-joined, the first ``at_most`` of them."""
    quoted = [repr(item) for item in items]
    more = f", ... ({len(quoted)} in all)" if len(quoted) > at_most else ""
    return ", ".join(quoted[:at_most]) + more


def _check_readable(group: dict[str, tuple[str, bytes | CleanError]], source: str) -> None:
    """Raises the error of a member that could not be read (a link to nothing): the sample is rejected
    whole, as it is not the sample its writer meant."""
    error = next((data for _, data in group.values() if isinstance(data, CleanError)), None)
    if error is not None:
        raise CleanError(error.reason, f"{source}: {error.detail}")


def json_object(data: bytes, what: str) -> dict[str, Any]:
    """A sample's json (``what`` names it in the error) as a dict; ``read.bad_json`` when it is not JSON
    or not an object."""
    try:
        info = load_json(data.decode("utf-8", errors="surrogateescape").lstrip("\ufeff"))
    except ValueError as e:
        raise CleanError("read.bad_json", f"{what} is not valid JSON ({e})") from e
    if not isinstance(info, dict):
        raise CleanError("read.bad_json", f"{what} holds a JSON {type(info).__name__}, expected an object")
    return info


def _member(group: dict[str, tuple[str, bytes]], suffixes: tuple[str, ...]) -> tuple[str, bytes] | None:
    """``(name, bytes)`` of the first member with one of ``suffixes`` that has bytes."""
    for suffix in suffixes:
        if suffix in group and group[suffix][1]:
            return group[suffix]
    return None


def _caption(value: Any, source: str) -> str | None:
    if is_empty(value):
        return None
    if not isinstance(value, str):
        raise CleanError("read.bad_type", f"{source}: json 'caption' is {shown(value)}, expected a string")
    return value


def _media(group: dict[str, tuple[str, bytes]], extensions: frozenset[str]) -> Media | None:
    """The first member with one of ``extensions`` that has bytes (``s1.flac`` empty, ``s1.wav`` not:
    the wav), else the first one, whose emptiness the cleaner reports."""
    found = [_as_media(name, data) for suffix, (name, data) in group.items() if suffix in extensions]
    return next((media for media in found if media.data or media.size), found[0] if found else None)


def _as_media(name: str, data: bytes | _Range) -> Media:
    if isinstance(data, _Range):
        return Media(uri=data.path, offset=data.offset, size=data.size, name=name)
    return Media(data=data, name=name)


def _label(data: bytes | None) -> int | str | None:
    """``.cls`` content: an int when it is one (as webdataset decodes it), else the stripped text."""
    if data is None:
        return None
    text = data.decode("utf-8", errors="surrogateescape").strip()
    if not text:
        return None
    return int(text) if _INT.match(text) else text
