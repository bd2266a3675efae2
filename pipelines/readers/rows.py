"""Rows of a table file (JSON lines or array, CSV/TSV, Parquet) as ``(line, dict)``, or a ``Reject`` per bad row.

Used by the manifest reader and by the imagefolder/audiofolder metadata reader. Text is decoded with
``surrogateescape`` so invalid UTF-8 reaches the text cleaner as lone surrogates instead of failing here.
A file that starts with a UTF-16 or UTF-32 byte order mark (Excel's "Unicode Text" export, files saved by
Windows tools as "Unicode") is read in that encoding (``as_utf8``).
A file that cannot be read, decompressed or decoded as its format (a cut Parquet file, a plain file
named ``.gz``, a compressed file cut short) ends in one ``read.unreadable`` reject naming it; the rows read
before that are kept. A column name the header or schema repeats is read as pandas reads it: the
first keeps its name, the later ones become ``name.1``, ``name.2``, ... (see ``unique_columns``).
"""

from __future__ import annotations

import base64
import bz2
import codecs
import collections
import contextlib
import csv
import datetime
import decimal
import gzip
import io
import itertools
import json
import lzma
import math
import posixpath
import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from pipelines.clean.text import wide_encoding
from pipelines.errors import CleanError
from pipelines.readers.common import COLUMNS, TEXT_COLUMNS, reject
from schemas import Reject

FORMATS: dict[str, str] = {
    "jsonl": "jsonl",
    "json": "jsonl",
    "ndjson": "jsonl",
    "csv": "csv",
    "tsv": "csv",
    "parquet": "parquet",
    "pq": "parquet",
}
_COMPRESSED = (".gz", ".bz2", ".zst", ".zstd", ".deflate", ".xz", ".lzma")  # all Beam detects
_CHUNK = 1 << 16  # compressed bytes read at a time by ``_Streams``
_BOM = "\ufeff"
_CSV_FIELD_LIMIT = 1 << 26  # the csv module's default (128 KiB) is shorter than some captions
_PARQUET_BATCH = 4096
_PARQUET_BATCH_BYTES = 64 << 20  # uncompressed bytes of rows per batch read (``parquet_batch_rows``)
# Lists and objects nested deeper than this are refused: the recursive steps after reading (meta
# cleaning, json.dumps, pickling between workers) would overflow the stack near 1000 levels, and no
# hand-written metadata comes near 100 (Ruby's JSON parser has the same default limit).
MAX_JSON_DEPTH = 100
_TOO_DEEP = f"lists and objects nested more than {MAX_JSON_DEPTH} levels deep"
_DECODER = json.JSONDecoder(strict=False)  # raw tabs inside strings are common; accept them
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
ROW_KEYS = frozenset(COLUMNS + TEXT_COLUMNS)  # a JSON object with one of these is a row, not a document
_MEDIA_STRUCT = frozenset({"bytes", "path"})  # a Hugging Face image/audio cell: one row's value
_NOT_ROWS = "read.json_object"  # the reason for a .json file that is one JSON object, not rows
_LIST_ROW = "a JSON list, expected an object"  # the detail's end for a row that is an array (pandas' values)

# ``(where, row)``: ``where`` is the 1-based physical line (Parquet: row index + 1); in a JSON array with
# several elements starting on one line, ``LINE[INDEX]`` (the element's 0-based index) tells them apart
Row = tuple[int | str, dict[str, Any]]


def format_of(path: str, format: str | None = None) -> str | None:
    """``jsonl`` | ``csv`` | ``tsv`` | ``parquet`` for ``path`` (by extension, after any compression suffix)."""
    if format is not None:
        return format.lower()
    name = posixpath.basename(path).lower()
    for suffix in _COMPRESSED:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    ext = posixpath.splitext(name)[1][1:]
    return ext if ext in FORMATS else None


class _Header(list[str]):
    """The column names a CSV/TSV header line gives, repeats included, yielded before its rows: a
    header with no rows under it still tells ``columns_of`` the columns. ``iter_rows`` leaves it out."""


def iter_rows(path: str, fmt: str, name: str) -> Iterator[Row | Reject]:
    """Rows of ``path`` in file order; ``line`` is the 1-based physical line (Parquet: row index + 1)."""
    return (item for item in _items(path, fmt, name) if not isinstance(item, _Header))


def _items(path: str, fmt: str, name: str) -> Iterator[Row | Reject | _Header]:
    """``iter_rows`` with the CSV/TSV header."""
    if FORMATS.get(fmt) is None:
        raise ValueError(f"unknown table format {fmt!r} for {path}; use one of {sorted(FORMATS)}")
    line = 0
    try:
        for item in _rows(path, fmt, name):
            line = item[0] if isinstance(item, tuple) else line
            yield item
    except _Unreadable as e:
        kept = f"; the rows up to line {line} are kept" if line else ""
        yield reject("read.unreadable", f"{name}: cannot read the file ({e}){kept}", name)


def columns_of(path: str, fmt: str, name: str, rows: int = 100) -> list[list[str]]:
    """The column names of ``path``'s first rows, read cheaply: one list for Parquet (its schema) and
    CSV/TSV (the header line, with no rows under it too), repeated names included; one per row for JSON
    (up to ``rows`` rows that parse, among the first ``10 * rows`` lines). Empty where nothing can be
    told: no rows, or a file that cannot be read (its reader reports that). A JSON file that is one
    JSON object, not rows (COCO annotations, pandas' column-oriented ``to_json``), or whose first rows
    are arrays, not objects (pandas' ``orient="values"``), raises ``ValueError`` saying so."""
    if FORMATS[fmt] == "parquet":
        schema = parquet_schema(path)
        return [list(schema.names)] if schema is not None else []
    found: list[dict[str, Any]] = []
    lists = 0  # rows that are arrays
    with contextlib.closing(_items(path, fmt, name)) as items:
        for item in itertools.islice(items, 10 * rows):
            if isinstance(item, _Header):
                return [list(item)]
            if isinstance(item, Reject):
                if item.reason == _NOT_ROWS:
                    raise ValueError(item.detail)
                lists += item.detail.endswith(_LIST_ROW)
                continue
            found.append(item[1])
            if len(found) >= rows:
                break
    if not found and lists:
        raise ValueError(
            f"{name}: its first rows are JSON arrays of values, not objects naming their columns (the layout "
            "pandas' DataFrame.to_json(orient=\"values\") writes), so no row has an id or a text, image or "
            "audio: a JSON manifest must be JSON Lines (one row object per line) or a JSON array of row "
            'objects; from pandas, write the rows: df.to_json(path, orient="records", lines=True)'
        )
    # pandas' to_json() written to a .jsonl file; in a .json file only a top-level object can be one, and
    # ``_json_file_rows`` tells (the one row of an array holding a list is a row)
    if fmt != "json" and len(found) == 1 and _by_column(found[0]):
        raise ValueError(_not_rows(name, found[0]))
    return [list(row) for row in found]


def parquet_schema(path: str) -> Any:
    """The Arrow schema of a Parquet file; None where it cannot be read (its reader reports that)."""
    import pyarrow.parquet as pq

    try:
        with _parquet_file(path) as f:
            return pq.ParquetFile(f).schema_arrow
    except Exception:  # a cut or garbled file: read.unreadable when read
        return None


def has_rows(path: str, fmt: str, name: str) -> bool:
    """Whether ``path`` holds a row besides its header: a good one or a bad one (which becomes a reject
    row); True when it cannot be read, which its reader reports. Reads up to the first row."""
    if FORMATS[fmt] == "parquet":
        import pyarrow.parquet as pq

        try:
            with _parquet_file(path) as f:
                return pq.ParquetFile(f).metadata.num_rows > 0
        except Exception:  # a cut or garbled file: read.unreadable when read
            return True
    with contextlib.closing(_items(path, fmt, name)) as items:
        return any(not isinstance(item, _Header) for item in items)


def unreadable(path: str, fmt: str, name: str) -> str | None:
    """Why ``path`` cannot be read from its start (its ``read.unreadable`` reject's detail: a plain file
    named ``.gz``, a Parquet file without its footer), or None where a first row or header reads."""
    with contextlib.closing(_items(path, fmt, name)) as items:
        first = next(items, None)
    return first.detail if isinstance(first, Reject) and first.reason == "read.unreadable" else None


def is_blank(path: str) -> bool:
    """Whether ``path`` holds nothing but white space once decompressed (0 bytes: a failed export, a full
    disk); False when it cannot be read, which its reader reports."""
    try:
        with _text_file(path) as f:
            first = True
            while chunk := f.read(_CHUNK):
                if (chunk.removeprefix(_BOM.encode()) if first else chunk).strip():
                    return False
                first = False
    except Exception:  # unreadable, cut, not what its name says: left to the reader's reject
        return False
    return True


def unique_columns(names: list[str]) -> list[str]:
    """``names`` with each repeat renamed as pandas reads it: the first keeps its name, the later ones
    become ``name.1``, ``name.2``, ... (past names the file already has). Without it the last of a
    repeated column would overwrite the others in each row (an empty second ``text`` erasing the first)."""
    if len(set(names)) == len(names):
        return names
    taken, renamed = set(names), []
    for name in names:
        if name in renamed:
            number = 1
            while f"{name}.{number}" in taken:
                number += 1
            name = f"{name}.{number}"
            taken.add(name)
        renamed.append(name)
    return renamed


class _Unreadable(Exception):
    """Opening, reading or decompressing the file failed; ``iter_rows`` turns it into one reject.

    Raised only around the I/O calls, so that a bug in the row parsers still fails loudly.
    """

    def __init__(self, error: Exception) -> None:
        if isinstance(error, EOFError):  # what each reader ``decompressed`` returns raises at a cut
            text = "it ends before its compressed stream does: the file was cut short"
        elif isinstance(error, CleanError):
            text = error.detail
        else:
            text = f"{type(error).__name__}: {error}"
        super().__init__(_ADDRESS.sub("", text))


@contextlib.contextmanager
def _text_file(path: str) -> Iterator[BinaryIO]:
    """The bytes of the text table at ``path``, decompressed as its suffix says (as Beam's AUTO) and
    as UTF-8 (``as_utf8``)."""
    from apache_beam.io.filesystem import CompressionTypes

    with _open(path) as raw, decompressed(raw, CompressionTypes.detect_compression_type(path)) as data:
        yield as_utf8(data)


def _rows(path: str, fmt: str, name: str) -> Iterator[Row | Reject | _Header]:
    if FORMATS[fmt] == "parquet":
        yield from _parquet_rows(path)
        return
    with _text_file(path) as f:
        if fmt == "json":
            yield from _json_file_rows(f, name)
        elif FORMATS[fmt] == "jsonl":
            yield from _json_rows(_lines(f), name)
        elif fmt == "tsv":
            yield from _tsv_rows(_lines(f), name)
        else:
            yield from _csv_rows(_lines(f), name, delimiter=",")


def _json_file_rows(f: BinaryIO, name: str) -> Iterator[Row | Reject]:
    """Rows of a .json file: JSON lines, or one JSON document: an array of objects (LLaVA-style
    annotation files), pretty-printed or not. It is read whole to tell which; when reading stops early
    (a cut compressed file) the rows in what was read come first, then the error.

    A document that is one object is one row when it has a manifest column and those hold one value
    each, else one ``read.json_object`` reject (a COCO annotation file, or pandas' default ``to_json``
    with one object per column, is not rows). A file whose first line is not a whole JSON value and
    that is no JSON document either is read as lines, but where no line gives a row (a pretty-printed
    document with an error in it) it is one reject, not one per line."""
    lines: list[bytes] = []
    error: _Unreadable | None = None
    try:
        lines.extend(_lines(f))
    except _Unreadable as e:
        error = e
    data = b"".join(lines)
    text = data.decode("utf-8", errors="surrogateescape").lstrip(_BOM)
    if text.lstrip().startswith("["):
        yield from _json_array_rows(text, name)
    else:
        document: Any = None
        problem: ValueError | None = None
        try:
            document = load_json(text)
        except ValueError as e:  # JSON lines ("Extra data" after the first line's value), or broken
            problem = e
        if isinstance(document, dict):
            line = 1 + text.count("\n", 0, _skip_space(text, 0))
            if ROW_KEYS.isdisjoint(document) or _by_column(document):
                yield reject(_NOT_ROWS, _not_rows(name, document), name)
            else:
                yield line, document
        else:
            rows = _json_rows(_lines(io.BytesIO(data)), name)
            start = _skip_space(text, 0)
            end = text.find("\n", start)
            first = text[start : end if end >= 0 else None].strip()
            if problem is not None and first.startswith("{") and not _is_json(first):
                detail = (f"{name}: not valid JSON ({problem}); its first line is not a whole JSON value, "
                          "so the file is read as one JSON document")
                rows = _rows_or(rows, reject("read.bad_json", detail, name))
            yield from rows
    if error is not None:
        raise error


def _not_rows(name: str, document: dict[str, Any]) -> str:
    """Why a JSON file that is one JSON object cannot be read as a manifest, and what to do."""
    column = _by_column(document)
    if column:
        value = document[column]
        what = (f"one JSON object of columns, not rows ({column!r} holds an object of {len(value)} values "
                "keyed by row: the layout pandas' DataFrame.to_json() writes by default)")
    else:
        keys = ", ".join(list(document)[:10]) + (", ..." if len(document) > 10 else "")
        what = f"one JSON object (keys: {keys}), not rows"
    return (f"{name} is {what}: a JSON manifest must be JSON Lines (one row object per line) or a JSON array "
            f"of row objects{_pandas_hint(document) or coco_hint(document)}")


def _by_column(document: dict[str, Any]) -> str | None:
    """The first manifest column of a one-object document laid out as pandas' ``to_json()`` writes it:
    objects of values keyed by the row index, the same keys in every such column (or row numbers when
    there is one). None for a row, whose cells are values: a list (a bad cell, rejected as a row) or an
    image's ``{"bytes", "path"}`` struct, even with extra fields, is no column. ``label`` does not count."""
    columns = {key: value for key, value in document.items()
               if key in ROW_KEYS and key != "label" and isinstance(value, dict) and value
               and not value.keys() <= _MEDIA_STRUCT}
    indexes = {frozenset(map(str, value)) for value in columns.values()}
    if len(indexes) == 1 and (len(columns) > 1 or all(str(key).isdigit() for key in next(iter(indexes)))):
        return next(iter(columns))
    return None


def _pandas_hint(document: dict[str, Any]) -> str:
    """How to write rows with pandas when ``document`` has the layout of one of ``DataFrame.to_json``'s
    orients that are not rows (columns, index, split, table), or ''."""
    keys = document.keys()
    values = list(itertools.islice(document.values(), 10))
    by_row = bool(values) and all(isinstance(v, dict) and not ROW_KEYS.isdisjoint(v) for v in values)
    if _by_column(document) or by_row or {"columns", "data"} <= keys or {"schema", "data"} <= keys:
        return '; from pandas, write the rows: df.to_json(path, orient="records", lines=True)'
    return ""


def coco_hint(columns: Any) -> str:
    """How to turn COCO annotations (keys ``images`` and ``annotations``) into a manifest, or ''."""
    if "images" not in columns or "annotations" not in columns:
        return ""
    return ("; this is a COCO annotation file: convert it to rows of id, image, text first, one per caption "
            "(id: the annotation's id, image: the image's file_name under its image folder, text: the caption), "
            'e.g. a captions.jsonl beside train2017/ with lines like '
            '{"id": 48, "image": "train2017/000000000009.jpg", "text": "A man riding a horse."}')


def _is_json(text: str) -> bool:
    try:
        load_json(text)
    except ValueError:
        return False
    return True


def _rows_or(items: Iterator[Row | Reject], instead: Reject) -> Iterator[Row | Reject]:
    """``items``, or ``instead`` alone where they hold no row: the rejects are held until a row comes."""
    held: list[Reject] | None = []
    for item in items:
        if held is not None and isinstance(item, Reject):
            held.append(item)
            continue
        if held is not None:
            yield from held
            held = None
        yield item
    if held is not None:
        yield instead


def _open(path: str) -> BinaryIO:
    """``path``'s bytes as stored (local or remote, through Beam's file systems)."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    from pipelines.media import check_regular

    try:
        check_regular(path)  # a named pipe would block the worker
        return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    except Exception as e:  # missing, a broken link, no permission: Beam wraps them in several types
        raise _Unreadable(e) from e


@contextlib.contextmanager
def decompressed(f: BinaryIO, kind: str) -> Iterator[BinaryIO]:
    """``f`` read through the compression ``kind`` (one of Beam's ``CompressionTypes``); ``f`` stays open.

    Not Beam's own decompression (``FileSystems.open`` with a compression type): where a file ends
    inside its compressed stream, Beam's reader stops quietly and the file's tail is lost without a
    word; these readers raise ``EOFError`` there. Concatenated streams (``cat a.gz b.gz``, pbzip2's
    output) are read one after another, as gzip(1) reads them."""
    from apache_beam.io.filesystem import CompressionTypes

    if kind == CompressionTypes.UNCOMPRESSED:
        yield f
        return
    with _decompressor(f, kind) as data:
        yield data


def _decompressor(f: BinaryIO, kind: str) -> BinaryIO:
    from apache_beam.io.filesystem import CompressionTypes

    if kind == CompressionTypes.GZIP:
        return gzip.GzipFile(fileobj=f, mode="rb")
    if kind == CompressionTypes.BZIP2:
        return bz2.BZ2File(f)
    if kind == CompressionTypes.LZMA:
        return lzma.LZMAFile(f)  # .xz and the older .lzma
    if kind == CompressionTypes.DEFLATE:
        return io.BufferedReader(_Streams(f, zlib.decompressobj))
    if kind == CompressionTypes.ZSTD:
        import zstandard  # Beam depends on it

        # Beam's window limit, so that files written with ``zstd --long`` read as they do in Beam
        zstd = zstandard.ZstdDecompressor(max_window_size=1 << 31)
        return io.BufferedReader(_Streams(f, zstd.decompressobj))
    raise ValueError(f"unknown compression type {kind!r}")


class _Streams(io.RawIOBase):
    """The data of the compressed streams in ``f``, one after another, for DEFLATE (zlib) and zstd, which
    have no file class in the standard library. Raises ``EOFError`` where ``f`` ends inside a stream, as
    ``gzip``, ``bz2`` and ``lzma`` files do (zstandard's own ``stream_reader`` stops quietly there)."""

    def __init__(self, f: BinaryIO, new: Callable[[], Any]) -> None:
        self._f = f
        self._new = new  # a decompressor for the next stream
        self._decompressor = new()
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._out:
            if self._decompressor.eof:
                data = self._decompressor.unused_data or self._f.read(_CHUNK)
                if not data:
                    return 0
                self._decompressor = self._new()
            elif not (data := self._f.read(_CHUNK)):
                raise EOFError("Compressed file ended before the end-of-stream marker was reached")
            self._out = memoryview(self._decompressor.decompress(data))
        size = min(len(buffer), len(self._out))
        buffer[:size] = self._out[:size]
        self._out = self._out[size:]
        return size


def as_utf8(f: BinaryIO) -> BinaryIO:
    """``f`` as UTF-8: a file that starts with a UTF-16 or UTF-32 byte order mark is decoded as that
    encoding (the mark dropped) and encoded as UTF-8 while it is read; any other file is ``f`` itself.
    Without it such a file read as UTF-8 holds a NUL byte after every ASCII character: its header named
    no column mbm knows, or every line was a bad JSON row. A lone surrogate in it (half of a pair cut
    apart) becomes bytes that are invalid UTF-8, so the row's text is rejected or repaired as
    ``on_invalid_utf8`` says, as in a UTF-8 file; a file that ends inside a character is unreadable
    from there (the rows before are kept)."""
    if not hasattr(f, "peek"):
        f = io.BufferedReader(f)  # type: ignore[arg-type]
    try:
        head = f.peek(4)[:4]
    except Exception as e:  # noqa: BLE001 - gzip, zlib, bz2, lzma and zstd each raise their own types
        raise _Unreadable(e) from e
    encoding = wide_encoding(head)
    return f if encoding is None else io.BufferedReader(_Utf8(f, encoding))


class _Utf8(io.RawIOBase):
    """The text of a UTF-16 or UTF-32 stream (``as_utf8``), as UTF-8 bytes."""

    def __init__(self, f: BinaryIO, encoding: str) -> None:
        self._f = f
        self._encoding = encoding
        self._decoder = codecs.getincrementaldecoder(encoding)("surrogatepass")
        self._out = memoryview(b"")
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._out and not self._done:
            data = self._f.read(_CHUNK)
            self._done = not data
            try:
                text = self._decoder.decode(data, final=self._done)
            except UnicodeDecodeError:
                raise CleanError("read.unreadable", f"it ends inside a {self._encoding.upper()} character: "
                                 "the file was cut short") from None
            self._out = memoryview(text.encode("utf-8", "surrogatepass"))
        size = min(len(buffer), len(self._out))
        buffer[:size] = self._out[:size]
        self._out = self._out[size:]
        return size


def _lines(f: BinaryIO) -> Iterator[bytes]:
    """The lines of a text file with their endings: LF or CRLF, or a lone CR in a file with no LF
    before its end (classic Mac "CSV (Macintosh)" files), which would otherwise read as one line. In
    a file of LF lines a lone CR stays inside its line (a raw CR in a JSON string or a quoted cell)."""
    try:
        first = f.readline()
        second = f.readline() if first.endswith(b"\n") else b""
        if not second:
            yield from first.splitlines(keepends=True)  # bytes split at LF, CRLF and CR only
            return
        yield first
        yield second
        yield from iter(f.readline, b"")
    except Exception as e:  # gzip, zlib, bz2, lzma and zstd each raise their own types for bad data
        raise _Unreadable(e) from e


def _decoded(lines: Iterator[bytes]) -> Iterator[str]:
    for number, raw in enumerate(lines, start=1):
        text = raw.decode("utf-8", errors="surrogateescape")
        yield text[1:] if number == 1 and text.startswith(_BOM) else text


def load_json(text: str) -> Any:
    """``text`` as JSON, raw control characters in strings allowed; ``ValueError`` when it is not JSON
    or nests lists and objects more than ``MAX_JSON_DEPTH`` levels deep."""
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise ValueError(_TOO_DEEP) from None
    if _nested_too_deep(value, text):
        raise ValueError(_TOO_DEEP)
    return value


def _raw_decode(text: str, start: int) -> tuple[Any, int]:
    """The JSON value at ``start`` of ``text`` and where it ends; ``ValueError`` as ``load_json``."""
    try:
        return _DECODER.raw_decode(text, start)
    except RecursionError:
        raise ValueError(_TOO_DEEP) from None


def _nested_too_deep(value: Any, text: str, start: int = 0, end: int | None = None) -> bool:
    """Whether ``value`` (decoded from ``text[start:end]``) nests more than ``MAX_JSON_DEPTH`` levels,
    found level by level without recursion; a text with fewer brackets than that cannot, and is not walked."""
    if text.count("[", start, end) + text.count("{", start, end) <= MAX_JSON_DEPTH:
        return False
    level = [value]
    for _ in range(MAX_JSON_DEPTH):
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item if isinstance(item, list) else ())
            if isinstance(child, (dict, list))
        ]
        if not level:
            return False
    return True


def _json_rows(lines: Iterator[bytes], name: str) -> Iterator[Row | Reject]:
    for line, text in enumerate(_decoded(lines), start=1):
        text = text.strip().lstrip(_BOM)  # a BOM mid-file comes from concatenated files
        if not text:
            continue
        where = f"{name}:{line}"
        try:
            row = load_json(text)
        except ValueError as e:
            yield reject("read.bad_json", f"{where}: not valid JSON ({e})", where)
            continue
        if not isinstance(row, dict):
            yield _not_an_object(where, row)
            continue
        yield line, row


def _not_an_object(where: str, row: Any) -> Reject:
    if isinstance(row, list):
        return reject("read.bad_json", f"{where}: {_LIST_ROW}", where)
    return reject("read.bad_json", f"{where}: a JSON {type(row).__name__}, expected an object", where)


def _json_array_rows(text: str, name: str) -> Iterator[Row | Reject]:
    """Elements of a top-level JSON array, each located by the physical line it starts on, or, where
    several start on one line (an array written on one line), by ``LINE[INDEX]``: a row without an id,
    or a bad one, is then a reject of its own, not one of several sharing an id."""
    pos = text.index("[") + 1
    line = 1 + text.count("\n", 0, pos)
    expect_value = _skip_space(text, pos) >= len(text) or text[_skip_space(text, pos)] != "]"
    index, previous = 0, 0  # the element's index; the line the one before it started on
    while expect_value:
        start = _skip_space(text, pos)
        line += text.count("\n", pos, start)
        try:
            row, end = _raw_decode(text, start)
        except ValueError as e:
            where = f"{name}:{_element(line, index, line == previous)}"
            yield reject(
                "read.bad_json", f"{where}: not valid JSON ({e}); the rest of the array is skipped", where
            )
            return
        pos = _skip_space(text, end)
        more = pos < len(text) and text[pos] == ","
        after = _skip_space(text, pos + more)
        shared = line == previous or (more and "\n" not in text[start:after])
        at = _element(line, index, shared)
        where = f"{name}:{at}"
        if _nested_too_deep(row, text, start, end):
            yield reject("read.bad_json", f"{where}: {_TOO_DEEP}", where)
        elif isinstance(row, dict):
            yield at, row
        else:
            yield _not_an_object(where, row)
        previous = line
        line += text.count("\n", start, pos)
        expect_value = more
        pos += more
        index += 1
    end = _skip_space(text, pos)
    line += text.count("\n", pos, end)
    if end >= len(text) or text[end] != "]" or text[end + 1 :].strip():
        where = f"{name}:{line}"
        yield reject("read.bad_json", f"{where}: expected ',' or a final ']' in the JSON array", where)


def _element(line: int, index: int, shared: bool) -> int | str:
    """Where an array element is: its line, or ``LINE[INDEX]`` on a line it shares with another."""
    return f"{line}[{index}]" if shared else line


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


_EXCEL_SEP = re.compile(r"sep=([^\s\"])")  # the first line Excel writes to name a CSV's delimiter


def _csv_rows(lines: Iterator[bytes], name: str, delimiter: str) -> Iterator[Row | Reject | _Header]:
    """Rows of a CSV, parsed strictly so that a quote opened and never closed cannot swallow the
    rest of the file into one cell. A record that fails and whose quoted cell spans lines up to a line
    that balances its quotes (see ``_quoted_span``) is rejected whole, and parsing goes on after it:
    its continuation lines are no records. Any other failed record is taken from its first line alone,
    parsed leniently (``"12" inch`` reads as ``12 inch``, as a lenient parser would) when that gives
    exactly the header's columns, else rejected; either way parsing goes on at the next line. A first
    line ``sep=;`` (Excel's) names the delimiter."""
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    source = _decoded(lines)
    pending: collections.deque[str] = collections.deque()  # lines to read again after a failed record
    taken: list[str] = []  # the lines the current record consumed
    base = 0  # physical lines before the current reader's first
    first_line = next(source, None)
    if first_line is not None and (excel := _EXCEL_SEP.fullmatch(first_line.rstrip("\r\n"))):
        delimiter, base = excel.group(1), 1  # Excel's "sep=;" line names the delimiter; the header follows
    elif first_line is not None:
        pending.append(first_line)

    def feed() -> Iterator[str]:
        while True:
            if pending:
                line = pending.popleft()
            elif (line := next(source, None)) is None:
                return
            taken.append(line)
            yield line

    reader = csv.reader(feed(), delimiter=delimiter, strict=True)
    table = _Table(name, "read.bad_csv", "cells")
    while True:
        taken.clear()
        start = base + reader.line_num + 1
        where = f"{name}:{start}"
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            span = _quoted_span(taken)
            pending.extendleft(reversed(taken[span or 1 :]))
            base, reader = start + max(span - 1, 0), csv.reader(feed(), delimiter=delimiter, strict=True)
            if span:
                detail = f"{where}: cannot parse the record on lines {start}-{start + span - 1} ({e})"
                yield reject("read.bad_csv", detail, where)
                continue
            first = taken[0] if taken else ""
            try:
                cells = next(csv.reader([first.rstrip("\r\n")], delimiter=delimiter), [])
            except csv.Error:
                cells = None
            if cells is None or (table.header is not None and len(cells) != len(table.header)):
                # its cells would shift into the wrong columns (an image path read as caption text)
                yield reject("read.bad_csv", f"{where}: cannot parse the row ({e})", where)
                continue
        yield from table.take(start, cells)


def _tsv_rows(lines: Iterator[bytes], name: str) -> Iterator[Row | Reject | _Header]:
    """Rows of a TSV: one record per line, cells split at tabs and taken as they are. There is no
    quoting: a quote is an ordinary character, as pandas' ``quoting=csv.QUOTE_NONE`` reads it (Common
    Voice sentences hold unbalanced quotes, which a CSV parser would join to the lines after them). A
    line with more cells than the header has columns (a tab inside a cell) is rejected alone; one with
    fewer is padded with empty cells, as the CSV reader and pandas do."""
    table = _Table(name, "read.bad_tsv", "tab-separated cells",
                   " (a TSV row is one line with one cell per column, and a cell holds no tab)")
    for line, text in enumerate(_decoded(lines), start=1):
        yield from table.take(line, text.rstrip("\r\n").split("\t"))


class _Table:
    """The header of a CSV/TSV, then the rows under it: blank lines skipped, a row with fewer cells
    padded with empty ones (as pandas does), one with more rejected alone (``reason``)."""

    def __init__(self, name: str, reason: str, cells: str, hint: str = "") -> None:
        self.name, self.reason, self.cells, self.hint = name, reason, cells, hint
        self.header: list[str] | None = None  # repeated names made unique

    def take(self, line: int, cells: list[str]) -> Iterator[Row | Reject | _Header]:
        if not any(cell.strip() for cell in cells):
            return
        if self.header is None:
            # a blank name as pandas reads it: "Unnamed: 2" for the third column
            header = [cell.strip() or f"Unnamed: {number}" for number, cell in enumerate(cells)]
            yield _Header(header)
            self.header = unique_columns(header)
            return
        if len(cells) > len(self.header):
            where = f"{self.name}:{line}"
            detail = f"{where}: {len(cells)} {self.cells} but the header has {len(self.header)} columns{self.hint}"
            yield reject(self.reason, detail, where)
            return
        yield line, dict(zip(self.header, cells + [""] * (len(self.header) - len(cells)), strict=True))


def _quoted_span(lines: list[str]) -> int:
    """How many of ``lines`` (those a record that failed to parse took) the record spans: up to the
    first later line at which the count of quote characters turns even, as it does on the line where
    a quoted cell holding unescaped quotes (``"a "b" c"``) ends. 0 when the first line's count is even
    (no quote left open) or no later line evens it (a quote never closed: the lines after it are
    records of their own)."""
    count = lines[0].count('"') if lines else 0
    if count % 2 == 0:
        return 0
    for number, line in enumerate(lines[1:], start=2):
        count += line.count('"')
        if count % 2 == 0:
            return number
    return 0


@contextlib.contextmanager
def _parquet_file(path: str) -> Iterator[BinaryIO]:
    """``path``'s Parquet bytes, seekable as Arrow needs them: a compressed file (``.parquet.gz``) is
    decompressed into memory first."""
    from apache_beam.io.filesystem import CompressionTypes

    kind = CompressionTypes.detect_compression_type(path)
    with _open(path) as f:
        if kind == CompressionTypes.UNCOMPRESSED:
            yield f
            return
        try:
            with decompressed(f, kind) as stream:
                data = io.BytesIO(stream.read())
        except Exception as e:  # a cut or garbled compressed file
            raise _Unreadable(e) from e
        yield data


def _parquet_rows(path: str) -> Iterator[Row]:
    with _parquet_file(path) as f:
        line = 0
        classes: dict[str, Any] | None = None  # column -> its datasets feature holding a ClassLabel
        for batch in _batches(f):
            if classes is None:
                classes = _class_label_features(batch.schema.metadata)
            names = unique_columns(batch.schema.names)
            if names != batch.schema.names:
                batch = batch.rename_columns(names)
            for row in _pylist(batch):
                line += 1
                yield line, {key: _jsonable(_class_name(value, classes[key]) if key in classes else value)
                             for key, value in row.items()}


def _class_label_features(metadata: dict[bytes, bytes] | None) -> dict[str, Any]:
    """``{column: its datasets feature}`` for the columns a Hugging Face ``datasets`` Parquet file
    (``to_parquet``, the Hub's Parquet export) declares in its schema metadata with a ``ClassLabel``
    anywhere in them (the column itself, lists of them, a struct's field, an object list's field): such a
    value is a class's index, and ``datasets`` shows its name (``features[column].int2str``)."""
    try:
        features = json.loads((metadata or {}).get(b"huggingface", b"{}"))["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return {}
    if not isinstance(features, dict):
        return {}
    return {column: feature for column, feature in features.items() if _has_class_label(feature)}


def _has_class_label(feature: Any) -> bool:
    if not isinstance(feature, dict):
        return False
    if feature.get("_type") == "ClassLabel":
        names = feature.get("names")
        return isinstance(names, list) and bool(names) and all(isinstance(n, str) for n in names)
    return any(_has_class_label(f) for f in feature.values())


def _class_name(value: Any, feature: Any) -> Any:
    """``value`` with each class index of ``feature`` (a ``datasets`` feature) replaced by its class name;
    -1, ``datasets``' "no label", is none; an index the names do not cover, or a value of another shape than
    the feature says, is kept as it is."""
    if not isinstance(feature, dict):
        return value
    kind = feature.get("_type")
    if kind == "ClassLabel":
        names = feature.get("names") or []
        if isinstance(value, int) and not isinstance(value, bool):
            if value == -1:
                return None
            if 0 <= value < len(names) and isinstance(names[value], str):
                return names[value]
        return value
    if kind in ("List", "Sequence", "LargeList"):
        inner = feature.get("feature")
        if isinstance(value, list):
            return [_class_name(v, inner) for v in value]
        if isinstance(value, dict) and isinstance(inner, dict) and "_type" not in inner:
            # a Sequence of a struct, which datasets stores as a struct of lists
            return {k: [_class_name(x, inner.get(k)) for x in v] if isinstance(v, list) else v for k, v in value.items()}
        return value
    if kind is None and isinstance(value, dict):  # a struct: {field: feature}
        return {k: _class_name(v, feature.get(k)) for k, v in value.items()}
    return value


def _batches(f: BinaryIO) -> Iterator[Any]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(f)
        yield from parquet.iter_batches(batch_size=parquet_batch_rows(parquet.metadata))
    except Exception as e:  # Arrow raises ArrowInvalid, OSError, ... for a cut or garbled file
        raise _Unreadable(e) from e


def parquet_batch_rows(metadata: Any) -> int:
    """Rows per batch read from a Parquet file: ``_PARQUET_BATCH``, or fewer when its rows are big (images
    or audio as bytes cells: 4096 one-megabyte rows would be 4 GB in Python objects at once), so that a
    batch holds about ``_PARQUET_BATCH_BYTES`` of uncompressed data."""
    rows = metadata.num_rows
    size = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    if rows <= 0 or size <= 0:
        return _PARQUET_BATCH
    return max(1, min(_PARQUET_BATCH, _PARQUET_BATCH_BYTES * rows // size))


def _pylist(batch: Any) -> list[dict[str, Any]]:
    """The rows of a record batch; a column ``to_pylist`` cannot convert is converted cell by cell."""
    try:
        return batch.to_pylist()
    except OverflowError:
        columns = [_column(column) for column in batch.columns]
        return [dict(zip(batch.schema.names, cells, strict=True)) for cells in zip(*columns, strict=True)]


def _column(column: Any) -> list[Any]:
    try:
        return column.to_pylist()
    except OverflowError:
        return [_cell(scalar) for scalar in column]


def _cell(scalar: Any) -> Any:
    """One Parquet cell as Python. A timestamp, date or duration beyond Python's range (a 2**63-1
    "never expires" sentinel) stays the integer Arrow stores it as, in the column's unit; only that
    value changes, the rest of the cell converts as usual."""
    import pyarrow as pa

    try:
        return scalar.as_py()
    except OverflowError:
        if isinstance(scalar, pa.StructScalar):
            return {key: _cell(value) for key, value in scalar.items()}
        if isinstance(scalar, pa.MapScalar):
            return [(_cell(pair["key"]), _cell(pair["value"])) for pair in scalar.values]
        if hasattr(scalar, "values"):  # the list types
            return [_cell(item) for item in scalar.values]
        value = scalar.value  # a temporal scalar's integer; a dictionary-encoded one's value scalar
        return _cell(value) if isinstance(value, pa.Scalar) else value


def _jsonable(value: Any) -> Any:
    """Parquet cell as a JSON type, so meta survives ``json.dumps`` downstream; bytes stay bytes."""
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def meta_value(value: Any) -> Any:
    """A meta cell safe for JSON: bytes become base64 text (binary meta columns are rare); NaN and
    infinities become null (strict JSON has no such numbers; NaN is how pandas writes a missing cell)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {k: meta_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [meta_value(v) for v in value]
    return value
