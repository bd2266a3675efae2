"""Helpers every reader shares: ids, empty cells, media paths, rejects, first-wins id tracking."""

from __future__ import annotations

import base64
import binascii
import math
import os
import posixpath
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

from pipelines.errors import CleanError
from pipelines.media import other_form
from schemas import Media, Reject

STAGE = "read"
COLUMNS: tuple[str, ...] = ("id", "text", "image", "audio", "label")
TEXT_COLUMNS = ("text", "caption", "transcription")  # a row's first non-empty one is its text
# Extensions of the formats the cleaners decode here (Pillow with AVIF and OpenJPEG; libsndfile with
# MP3): the cleaners sniff the content, so these only tell media from other files. Hugging Face's
# imagefolder and audiofolder also list EPS/PS (Ghostscript), WMF/EMF (Windows), BUFR/GRIB/HDF5
# (Pillow's stubs), MPEG and video containers, Sound Designer II (libsndfile reads it only from a file
# with its resource fork) and headerless RAW, which nothing here decodes, and FLI/FLC, FTC/FTU, IIM, PCD
# and PXR, which Pillow opens but no test here writes; HEIC, JPEG XL and M4A/AAC are left out as well.
IMAGE_EXTS = frozenset({
    "jpg", "jpeg", "jpe", "jfif", "pjpeg", "pjp", "mpo", "png", "apng", "gif", "bmp", "dib", "tif", "tiff",
    "webp", "avif", "avifs", "tga", "icb", "vda", "vst", "jp2", "j2k", "j2c", "jpc", "jpf", "jpx", "pbm",
    "pgm", "ppm", "pnm", "pfm", "qoi", "ico", "cur", "icns", "blp", "dds", "pcx", "dcx", "psd", "sgi", "rgb",
    "rgba", "bw", "ras", "xbm", "xpm", "msp", "im", "gbr", "fit", "fits",
})
AUDIO_EXTS = frozenset({
    "wav", "wavex", "flac", "ogg", "oga", "opus", "mp3", "aiff", "aif", "aifc", "au", "snd", "caf", "w64",
    "rf64", "voc", "sph", "nist", "avr", "htk", "ircam", "mat4", "mat5", "mpc2k", "paf", "pvf", "sds", "svx",
    "wve", "xi",
})

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_URL = re.compile(r"^https?://", re.IGNORECASE)
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")  # C:\Users\me\a.jpg, D:/data/a.wav


def has_scheme(path: str) -> bool:
    """True for ``gs://…``-style URIs, false for local paths."""
    return bool(_SCHEME.match(path))


def local_path(path: str) -> str | None:
    """The local filesystem path of ``path``, or None for a remote URI. A ``file://`` URI is read as
    RFC 8089 writes it (``pathlib.Path.as_uri()``): ``file:///abs`` or ``file://localhost/abs``, its
    escapes decoded (``%20`` a space); a ``file://name/...`` with another host stays the relative path
    ``name/...`` it was read as before. So is ``file:/abs``, RFC 8089's form without an authority, as
    Java's ``File.toURI()`` and Hadoop and Spark paths write it."""
    if path.startswith("file://"):
        local = path[len("file://"):]
        if local.startswith("localhost/"):
            local = local[len("localhost"):]
        return unquote(local) if "%" in local else local
    if path.startswith("file:/"):
        local = path[len("file:"):]
        return unquote(local) if "%" in local else local
    return None if has_scheme(path) else path


def absolute(path: str) -> str:
    """``path`` made absolute when local, so workers with another cwd still find it; URIs unchanged."""
    local = local_path(path)
    return path if local is None else os.path.abspath(local)


def extension(name: str) -> str:
    """Lower-case last extension of a file name, without the dot."""
    return posixpath.splitext(name)[1][1:].lower()


def media_kind(name: str) -> str | None:
    """``"image"``, ``"audio"`` or None, by file extension."""
    ext = extension(name)
    if ext in IMAGE_EXTS:
        return "image"
    if ext in AUDIO_EXTS:
        return "audio"
    return None


def text_column(columns: Iterable[str]) -> str | None:
    """The column that holds a row's text: the first of ``TEXT_COLUMNS`` among ``columns``. Given a row
    (a mapping), the first whose cell is not empty or blank, so that a row with an empty ``text`` and a
    ``caption`` gets the caption (a CSV has every column in every row); else the first present."""
    present = [c for c in TEXT_COLUMNS if c in columns]
    if isinstance(columns, Mapping):
        return next((c for c in present if not _blank(columns[c])), present[0] if present else None)
    return present[0] if present else None


def is_empty(value: Any) -> bool:
    """Null, an empty string/bytes, or a float NaN (how pandas writes a missing cell)."""
    if value is None:
        return True
    if isinstance(value, (str, bytes)):
        return len(value) == 0
    return isinstance(value, float) and math.isnan(value)


def _blank(value: Any) -> bool:
    return is_empty(value) or (isinstance(value, str) and not value.strip())


def shown(value: Any, limit: int = 60) -> str:
    """``value``'s type and a repr cut to ``limit`` characters, for reject details."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= limit else text[:limit] + '...'}"


def normalize_id(value: Any, where: str) -> str:
    """The sample id as a string; raises ``CleanError`` (``read.missing_id`` / ``read.bad_type``)."""
    if isinstance(value, str):
        if value.strip():
            return value
        raise CleanError("read.missing_id", f"{where}: 'id' is empty")
    if is_empty(value):
        raise CleanError("read.missing_id", f"{where}: no 'id'")
    if isinstance(value, bool):
        raise CleanError("read.bad_type", f"{where}: 'id' is a bool, expected a string or an integer")
    if isinstance(value, int):
        return str(value)
    # pandas turns an int column with a gap into floats: 3.0 is the id 3
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    raise CleanError("read.bad_type", f"{where}: 'id' is {shown(value)}, expected a string or an integer")


def resolve_media(value: str, base: str, allow_outside: bool, where: str, column: str) -> str:
    """Absolute path or URI of a media cell written relative to ``base`` (a folder path or URI).

    Raises ``CleanError("read.path_escape")`` when it lies outside ``base`` and ``allow_outside`` is off.
    URIs and absolute paths count as outside unless they fall under ``base``. Symlinks are not resolved.
    An http(s) URL raises ``CleanError("read.url")`` either way: media are read, never downloaded.
    """
    if _URL.match(value):
        raise CleanError(
            "read.url",
            f"{where}: '{column}' is a web URL ({value!r}); mbm reads local files only and does not download: "
            "fetch the media first (e.g. img2dataset, which writes WebDataset tars) and read those tars with "
            "[input] shards = ...",
        )
    base_local = local_path(base)
    if _WINDOWS_DRIVE.match(value) and not (base_local and os.path.lexists(os.path.join(base_local, value))):
        raise CleanError(
            "read.windows_path",
            f"{where}: '{column}' is a Windows absolute path ({value!r}), which names no file on this machine: "
            "write the manifest's paths relative to its folder (images\\a.jpg is read as images/a.jpg), or "
            "replace the drive prefix with the folder the files are in here",
        )
    value_local = local_path(value)
    if value_local is not None and base_local is not None:
        value_local = _on_disk(value_local, base_local)
        resolved = os.path.normpath(os.path.join(base_local, value_local))
        inside = _is_under(resolved, os.path.normpath(base_local), os.sep)
    elif value_local is None:  # a URI
        resolved = value
        inside = base_local is None and _is_under(_norm_uri(value), _norm_uri(base), "/")
    else:  # a relative or absolute path next to a remote manifest
        if posixpath.isabs(value_local):
            resolved, inside = value_local, False
        else:
            resolved = _norm_uri(base.rstrip("/") + "/" + value_local)
            inside = _is_under(resolved, _norm_uri(base), "/")
    if not inside and not allow_outside:
        raise CleanError(
            "read.path_escape",
            f"{where}: '{column}' path {value!r} resolves to {resolved!r}, outside {base!r} "
            "(set allow_outside = true to allow it)",
        )
    return resolved


def _on_disk(value: str, base: str) -> str:
    """``value`` (a local path, relative to ``base`` or absolute) as the file it means is named here,
    where it names none as written: a manifest made on Windows writes ``img\\a.jpg``, which on POSIX is
    one file name with a backslash in it, and names with accents are stored decomposed by macOS but
    written composed by most tools (``pipelines.media.other_form``). A file that has the name as written
    is read as it is; only paths with a backslash or a non-ASCII character are looked up (one stat). The
    folder check comes after, so ``..\\x.jpg`` leaves the folder."""
    if (value.isascii() and "\\" not in value) or os.path.lexists(os.path.join(base, value)):
        return value
    if os.sep == "/":
        value = value.replace("\\", "/")
    return other_form(os.path.join(base, value)) or value


def _norm_uri(uri: str) -> str:
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{posixpath.normpath(rest)}"


def _is_under(path: str, base: str, sep: str) -> bool:
    return path == base or path.startswith(base.rstrip(sep) + sep)


def media_from(value: Any, base: str, allow_outside: bool, where: str, column: str) -> Media | None:
    """A ``Media`` for one manifest cell: a path/URI string, or a Hugging Face ``{"bytes", "path"}`` struct."""
    if is_empty(value):
        return None
    if isinstance(value, (bytes, bytearray)):
        return Media(data=bytes(value), name="")
    if isinstance(value, dict) and set(value) <= {"bytes", "path"}:
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, (bytes, bytearray)) and data:
            return Media(data=bytes(data), name=path if isinstance(path, str) else "")
        if not is_empty(data) and not isinstance(data, (bytes, bytearray)):  # a str of base64, a list of ints
            raise CleanError("read.bad_type", f"{where}: '{column}' struct's 'bytes' is {shown(data)}, expected "
                                              "binary data (a Parquet binary column, as datasets writes it) or null "
                                              "beside a 'path'")
        value = path
        if is_empty(value):
            return None
    if isinstance(value, dict) and "array" in value:
        raise CleanError(
            "read.bad_type",
            f"{where}: '{column}' is a decoded array ({', '.join(map(repr, value))}), as Hugging Face datasets "
            f"decodes audio in Python; mbm reads media files or their bytes: store the column as {{bytes, path}} "
            f"structs (datasets: ds.cast_column({column!r}, Audio(decode=False)) before to_parquet) or as paths",
        )
    if not isinstance(value, str):
        raise CleanError("read.bad_type", f"{where}: '{column}' is {shown(value)}, expected a path string "
                                          "or a {bytes, path} struct")
    name = value.strip()
    if not name:
        return None
    if name[:5].lower() == "data:":
        return data_uri(name, where, column)
    return Media(uri=resolve_media(name, base, allow_outside, where, column), name=value)


def data_uri(value: str, where: str, column: str) -> Media:
    """The bytes a ``data:`` URI holds (RFC 2397: ``data:image/png;base64,...`` as web pages and chat-format
    vision datasets embed images, or percent-escaped); ``read.bad_data_uri`` when they cannot be had. Its
    name keeps the media type only: the payload is the bytes, not a name to show."""
    header, comma, payload = value[len("data:"):].partition(",")
    if not comma:
        raise CleanError("read.bad_data_uri", f"{where}: '{column}' is a data: URI with no ',' before its data")
    if header.lower().endswith(";base64"):
        try:  # base64 wrapped at 76 characters (MIME) holds line breaks
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise CleanError("read.bad_data_uri", f"{where}: '{column}' is a data: URI ({header}) whose base64 "
                                                  f"does not decode: {e}") from None
    else:
        data = unquote_to_bytes(payload)
    return Media(data=data, name=f"data:{header},...")


def folder_of(path: str) -> str:
    """The folder that holds ``path`` (a local path or a URI)."""
    local = local_path(path)
    if local is not None:
        return os.path.dirname(os.path.abspath(local))
    scheme, _, rest = path.partition("://")
    return f"{scheme}://{posixpath.dirname(rest)}"


def display_name(path: str) -> str:
    """The short name used in ``source`` strings and reject ids: the file's base name."""
    return posixpath.basename(path.rstrip("/")) or path


def reject(reason: str, detail: str, source: str, sample_id: str | None = None) -> Reject:
    """A read-stage reject; lines too broken to carry an id use their source as id."""
    return Reject(id=sample_id or source, stage=STAGE, reason=reason, detail=detail, source=source)


class FirstWins:
    """Remembers the source of the first sample seen per id; later ones become ``read.duplicate_id``."""

    def __init__(self) -> None:
        self._first: dict[str, str] = {}

    def check(self, sample_id: str, source: str) -> Reject | None:
        if sample_id not in self._first:
            self._first[sample_id] = source
            return None
        return duplicate(sample_id, source, self._first[sample_id])


def duplicate(sample_id: str, source: str, kept: str) -> Reject:
    """The reject for a sample whose id was already taken by the sample at ``kept``."""
    return reject(
        "read.duplicate_id",
        f"id {sample_id!r} at {source} duplicates the one at {kept} (the first is kept)",
        source,
        sample_id,
    )


def strip_slashes(uri: str) -> str:
    """A folder URI without trailing slashes: ``gs://b/out/`` is ``gs://b/out``, ``gs://b/`` is ``gs://b``."""
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{rest.rstrip('/')}"


def remote_folder_exists(uri: str) -> bool:
    """Whether anything is stored under the folder ``uri`` of an object store (one object listed is enough)."""
    from apache_beam.io.filesystems import FileSystems

    (result,) = FileSystems.match([strip_slashes(uri) + "/**"], [1])
    return bool(result.metadata_list)
