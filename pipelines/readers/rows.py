"""Rows of a table file (JSON lines, CSV/TSV, Parquet) as ``(line, dict)``, or a ``Reject`` per broken row.

Used by the manifest reader and by the imagefolder/audiofolder metadata reader. Text is decoded with
``surrogateescape`` so invalid UTF-8 reaches the text cleaner as lone surrogates instead of failing here.
"""

from __future__ import annotations

import base64
import collections
import csv
import datetime
import decimal
import io
import json
import math
import posixpath
from collections.abc import Iterator
from typing import Any, BinaryIO

from pipelines.readers.common import reject
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
_COMPRESSED = (".gz", ".bz2", ".zst", ".deflate", ".xz", ".lzma")
_BOM = "\ufeff"
_CSV_FIELD_LIMIT = 1 << 26  # the csv module's default (128 KiB) is shorter than some captions
_PARQUET_BATCH = 4096

Row = tuple[int, dict[str, Any]]


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


def iter_rows(path: str, fmt: str, name: str) -> Iterator[Row | Reject]:
    """Rows of ``path`` in file order; ``line`` is the 1-based physical line (Parquet: row index + 1)."""
    if FORMATS.get(fmt) is None:
        raise ValueError(f"unknown table format {fmt!r} for {path}; use one of {sorted(FORMATS)}")
    if FORMATS[fmt] == "parquet":
        yield from _parquet_rows(path)
        return
    with _open(path, compressed=True) as f:
        if fmt == "json":
            # a .json file is JSON lines, or (LLaVA-style annotation files) one array of objects
            data = f.read()
            text = data.decode("utf-8", errors="surrogateescape").lstrip(_BOM)
            if text.lstrip().startswith("["):
                yield from _json_array_rows(text, name)
            else:
                yield from _json_rows(iter(io.BytesIO(data).readline, b""), name)
            return
        lines = iter(f.readline, b"")
        if FORMATS[fmt] == "jsonl":
            yield from _json_rows(lines, name)
        else:
            yield from _csv_rows(lines, name, delimiter="\t" if fmt == "tsv" else ",")


def _open(path: str, compressed: bool) -> BinaryIO:
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    from pipelines.media import check_regular

    check_regular(path)  # a named pipe would block the worker

    kind = CompressionTypes.AUTO if compressed else CompressionTypes.UNCOMPRESSED
    return FileSystems.open(path, compression_type=kind)


def _decoded(lines: Iterator[bytes]) -> Iterator[str]:
    for number, raw in enumerate(lines, start=1):
        text = raw.decode("utf-8", errors="surrogateescape")
        yield text[1:] if number == 1 and text.startswith(_BOM) else text


def _json_rows(lines: Iterator[bytes], name: str) -> Iterator[Row | Reject]:
    decoder = json.JSONDecoder(strict=False)  # raw tabs inside strings are common; accept them
    for line, text in enumerate(_decoded(lines), start=1):
        text = text.strip().lstrip(_BOM)  # a BOM mid-file comes from concatenated files
        if not text:
            continue
        where = f"{name}:{line}"
        try:
            row = decoder.decode(text)
        except ValueError as e:
            yield reject("read.bad_json", f"{where}: not valid JSON ({e})", where)
            continue
        if not isinstance(row, dict):
            yield reject("read.bad_json", f"{where}: a JSON {type(row).__name__}, expected an object", where)
            continue
        yield line, row


def _json_array_rows(text: str, name: str) -> Iterator[Row | Reject]:
    """Elements of a top-level JSON array, each numbered by the physical line it starts on."""
    decoder = json.JSONDecoder(strict=False)
    pos = text.index("[") + 1
    line = 1 + text.count("\n", 0, pos)
    expect_value = _skip_space(text, pos) >= len(text) or text[_skip_space(text, pos)] != "]"
    while expect_value:
        start = _skip_space(text, pos)
        line += text.count("\n", pos, start)
        where = f"{name}:{line}"
        try:
            row, end = decoder.raw_decode(text, start)
        except ValueError as e:
            yield reject(
                "read.bad_json", f"{where}: not valid JSON ({e}); the rest of the array is skipped", where
            )
            return
        if isinstance(row, dict):
            yield line, row
        else:
            yield reject("read.bad_json", f"{where}: a JSON {type(row).__name__}, expected an object", where)
        pos = _skip_space(text, end)
        line += text.count("\n", start, pos)
        expect_value = pos < len(text) and text[pos] == ","
        pos += expect_value
    end = _skip_space(text, pos)
    line += text.count("\n", pos, end)
    if end >= len(text) or text[end] != "]" or text[end + 1 :].strip():
        where = f"{name}:{line}"
        yield reject("read.bad_json", f"{where}: expected ',' or a final ']' in the JSON array", where)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _csv_rows(lines: Iterator[bytes], name: str, delimiter: str) -> Iterator[Row | Reject]:
    """Rows of a CSV/TSV, parsed strictly so that a quote opened and never closed cannot swallow the
    rest of the file into one cell. A record that fails is taken from its first line alone, parsed
    leniently (``"12" inch`` reads as ``12 inch``, as a lenient parser would) when that gives exactly
    the header's columns, else rejected; either way parsing goes on at the next line."""
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    source = _decoded(lines)
    pending: collections.deque[str] = collections.deque()  # lines to read again after a failed record
    taken: list[str] = []  # the lines the current record consumed

    def feed() -> Iterator[str]:
        while True:
            if pending:
                line = pending.popleft()
            elif (line := next(source, None)) is None:
                return
            taken.append(line)
            yield line

    base = 0  # physical lines before the current reader's first
    reader = csv.reader(feed(), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    while True:
        taken.clear()
        start = base + reader.line_num + 1
        where = f"{name}:{start}"
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            first, rest = (taken[0], taken[1:]) if taken else ("", [])
            pending.extendleft(reversed(rest))
            base, reader = start, csv.reader(feed(), delimiter=delimiter, strict=True)
            try:
                cells = next(csv.reader([first.rstrip("\r\n")], delimiter=delimiter), [])
            except csv.Error:
                cells = None
            if cells is None or (header is not None and len(cells) != len(header)):
                # its cells would shift into the wrong columns (an image path read as caption text)
                yield reject("read.bad_csv", f"{where}: cannot parse the row ({e})", where)
                continue
        if not any(cell.strip() for cell in cells):
            continue
        if header is None:
            header = [cell.strip() for cell in cells]
            continue
        if len(cells) > len(header):
            detail = f"{where}: {len(cells)} cells but the header has {len(header)} columns"
            yield reject("read.bad_csv", detail, where)
            continue
        yield start, dict(zip(header, cells + [""] * (len(header) - len(cells)), strict=True))


def _parquet_rows(path: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    with _open(path, compressed=False) as f:
        line = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=_PARQUET_BATCH):
            for row in batch.to_pylist():
                line += 1
                yield line, {key: _jsonable(value) for key, value in row.items()}


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
