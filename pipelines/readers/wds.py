"""WebDataset tar reader (img2dataset layout): ``{key}.jpg``, ``{key}.txt``, ``{key}.json``, ``{key}.cls``.

Members are grouped into samples the way ``webdataset`` does: consecutive members sharing the part of the
name before the first dot of the base name. A tar damaged part-way keeps the samples before the damage
and yields one ``read.corrupt_tar`` reject.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines.errors import CleanError
from pipelines.readers.common import (
    AUDIO_EXTS,
    IMAGE_EXTS,
    FirstWins,
    absolute,
    display_name,
    is_empty,
    normalize_id,
    reject,
    shown,
)
from pipelines.readers.rows import meta_value
from schemas import Media, RawSample, Reject

if TYPE_CHECKING:
    from pipelines.readers.source import SourceConfig

TEXT_SUFFIXES = ("txt", "text")
LABEL_SUFFIXES = ("cls", "label")
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_SKIP = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta (__index__ and the like)
_INT = re.compile(r"^[+-]?\d+$")


@dataclass(frozen=True)
class _Damage:
    member: str | None  # the member whose data was cut short; None when a header was unreadable
    offset: int
    error: str
    opened: bool = True


def iter_tar(
    path: str, config: SourceConfig | None = None, *, name: str | None = None
) -> Iterator[RawSample | Reject]:
    """Samples and rejects of one tar (plain or compressed), in member order; the first of one id wins."""
    name = name or display_name(path)
    seen = FirstWins()
    for key, group in _groups(absolute(path), name):
        if isinstance(group, Reject):
            yield group
            continue
        source = f"{name}:{key}"
        sample_id = key  # until the json names another
        try:
            info = _json(group, source)
            sample_id = _sample_id(info, key, source)
            sample = _sample(sample_id, info, group, source)
        except CleanError as e:
            yield reject(e.reason, e.detail, source, sample_id)
            continue
        yield seen.check(sample_id, source) or sample


def _groups(path: str, name: str) -> Iterator[tuple[str, dict[str, tuple[str, bytes]] | Reject]]:
    """``(key, {suffix: (member, bytes)})`` per sample; ``(key, Reject)`` once when the tar is damaged."""
    key, group, previous = "", {}, set()
    for item in _members(path, name):
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
        group.setdefault(suffix, (member, data))
    if group:
        yield key, group


def _complete(group: dict[str, Any], previous: set[str], damage: _Damage, key: str) -> bool:
    """Whether the sample being read when the damage came is whole: not cut, and has the members the last one had."""
    cut = _KEY.match(damage.member or "")
    if cut and cut.group(1) == key:
        return False
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


def _members(path: str, name: str) -> Iterator[tuple[str, bytes] | _Damage]:
    """``(member name, bytes)`` of the regular files of a tar, then a ``_Damage`` if it ends badly."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    from pipelines.media import check_regular

    try:
        check_regular(path)  # a named pipe would block the worker
        f = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    except Exception as e:  # missing, no permission, ...: Beam wraps them in several types
        yield _Damage(None, 0, f"{type(e).__name__}: {e}", opened=False)
        return
    with f:
        member, offset = None, 0
        try:
            stream = tarfile.open(fileobj=f, mode="r|*", tarinfo=_TarInfo)  # streamed: reads .tar.gz too
            while (info := stream.next()) is not None:
                offset = stream.offset
                if not info.isreg() or _SKIP.match(info.name):
                    continue
                member = info.name
                data = stream.extractfile(info).read()
                yield member, data
                member = None
                stream.members = []  # a streamed tar otherwise keeps every TarInfo
            if (error := getattr(stream, "mbm_header_error", None)) is not None:
                yield _Damage(None, offset, f"{type(error).__name__}: {error}")
        except Exception as e:  # tarfile.ReadError, EOFError, zlib.error, OSError: all mean damage
            yield _Damage(member, offset, f"{type(e).__name__}: {e}")


class _TarInfo(tarfile.TarInfo):
    """Notes a cut or garbled header on the tar: ``tarfile`` ends iteration there without an error."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:  # a zero block: the proper end of the archive
            raise
        except tarfile.HeaderError as e:
            tf.mbm_header_error = e  # type: ignore[attr-defined]
            raise


def _sample_id(info: dict[str, Any], key: str, source: str) -> str:
    """json ``key`` when it is a usable id (img2dataset writes one), else the tar key."""
    if is_empty(info.get("key")):
        return key
    try:
        return normalize_id(info["key"], source)
    except CleanError:
        return key


def _sample(
    sample_id: str, info: dict[str, Any], group: dict[str, tuple[str, bytes]], source: str
) -> RawSample:
    text = _bytes(group, TEXT_SUFFIXES)
    if text is None:
        text = _caption(info.get("caption"), source)
    image = _media(group, IMAGE_EXTS)
    audio = _media(group, AUDIO_EXTS)
    status = info.get("status")
    what = "no text, image or audio member"
    if isinstance(status, str) and status != "success":  # img2dataset keeps the json of a failed download
        what += f"; the json says status {status!r}"
        if isinstance(info.get("error_message"), str) and info["error_message"]:
            what += f": {info['error_message']}"
    if text is None and image is None and audio is None:
        raise CleanError("read.no_modality", f"{source}: {what}")
    label = _label(_bytes(group, LABEL_SUFFIXES))
    if label is None and not is_empty(info.get("label")):
        label = meta_value(info["label"])
    meta = {k: meta_value(v) for k, v in info.items() if k not in ("key", "caption", "label")}
    return RawSample(id=sample_id, text=text, image=image, audio=audio, label=label, meta=meta, source=source)


def _json(group: dict[str, tuple[str, bytes]], source: str) -> dict[str, Any]:
    if "json" not in group:
        return {}
    member, data = group["json"]
    try:
        info = json.loads(data.decode("utf-8", errors="surrogateescape").lstrip("\ufeff"), strict=False)
    except ValueError as e:
        raise CleanError("read.bad_json", f"{source}: {member} is not valid JSON ({e})") from e
    if not isinstance(info, dict):
        raise CleanError(
            "read.bad_json", f"{source}: {member} holds a JSON {type(info).__name__}, expected an object"
        )
    return info


def _bytes(group: dict[str, tuple[str, bytes]], suffixes: tuple[str, ...]) -> bytes | None:
    for suffix in suffixes:
        if suffix in group and group[suffix][1]:
            return group[suffix][1]
    return None


def _caption(value: Any, source: str) -> str | None:
    if is_empty(value):
        return None
    if not isinstance(value, str):
        raise CleanError("read.bad_type", f"{source}: json 'caption' is {shown(value)}, expected a string")
    return value


def _media(group: dict[str, tuple[str, bytes]], extensions: frozenset[str]) -> Media | None:
    for suffix, (member, data) in group.items():
        if suffix in extensions:
            return Media(data=data, name=member)
    return None


def _label(data: bytes | None) -> int | str | None:
    """``.cls`` content: an int when it is one (as webdataset decodes it), else the stripped text."""
    if data is None:
        return None
    text = data.decode("utf-8", errors="surrogateescape").strip()
    if not text:
        return None
    return int(text) if _INT.match(text) else text
