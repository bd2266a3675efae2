"""Manifest reader: one ``RawSample`` per row of a JSONL / JSON / CSV / TSV / Parquet manifest.

Columns ``id, text, image, audio, label``; every other column goes to ``meta`` unchanged. Media cells are
paths relative to the manifest's folder (or URIs) and become ``Media(uri=...)``; their bytes are not read here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pipelines.errors import CleanError
from pipelines.readers.common import (
    COLUMNS,
    FirstWins,
    absolute,
    display_name,
    folder_of,
    is_empty,
    media_from,
    normalize_id,
    reject,
    shown,
)
from pipelines.readers.rows import format_of, iter_rows, meta_value
from schemas import RawSample, Reject

if TYPE_CHECKING:
    from pipelines.readers.source import SourceConfig


def iter_manifest(
    path: str, config: SourceConfig | None = None, *, name: str | None = None
) -> Iterator[RawSample | Reject]:
    """Samples and rejects of one manifest, in file order; the first of several rows with one id wins."""
    fmt = format_of(path, config.format if config else None)
    if fmt is None:
        raise ValueError(f"cannot tell the format of manifest {path!r}; set format = jsonl | csv | parquet")
    name = name or display_name(path)
    base = folder_of(path)
    allow_outside = bool(config and config.allow_outside)
    seen = FirstWins()
    for item in iter_rows(absolute(path), fmt, name):
        if isinstance(item, Reject):
            yield item
            continue
        line, row = item
        source = f"{name}:{line}"
        sample_id = None
        try:
            sample_id = normalize_id(row.get("id"), source)
            sample = row_sample(sample_id, row, source, base, allow_outside)
        except CleanError as e:
            yield reject(e.reason, e.detail, source, sample_id)
            continue
        yield seen.check(sample_id, source) or sample


def row_sample(sample_id: str, row: dict[str, Any], source: str, base: str, allow_outside: bool) -> RawSample:
    """The sample for one manifest row; raises ``CleanError`` for wrong types, escaping paths, no modality."""
    text = text_cell(row.get("text"), source, "text")
    image = media_from(row.get("image"), base, allow_outside, source, "image")
    audio = media_from(row.get("audio"), base, allow_outside, source, "audio")
    if text is None and image is None and audio is None:
        raise CleanError("read.no_modality", f"{source}: no text, image or audio")
    label = row.get("label")
    return RawSample(
        id=sample_id,
        text=text,
        image=image,
        audio=audio,
        label=None if is_empty(label) else meta_value(label),
        meta={key: meta_value(value) for key, value in row.items() if key not in COLUMNS},
        source=source,
    )


def text_cell(value: Any, source: str, column: str) -> str | bytes | None:
    """A text cell: ``str`` (``bytes`` from a Parquet binary column), None when empty."""
    if is_empty(value):
        return None
    if not isinstance(value, (str, bytes)):
        raise CleanError("read.bad_type", f"{source}: '{column}' is {shown(value)}, expected a string")
    return value
