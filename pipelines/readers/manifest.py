"""Manifest reader: one ``RawSample`` per row of a JSONL / JSON / CSV / TSV / Parquet manifest.

Columns ``id, text, image, audio, label``; the text is a row's first non-empty cell of ``text``,
``caption`` and ``transcription``. Every other column goes to ``meta`` unchanged. Media cells are paths
relative to the manifest's folder (or URIs) and become ``Media(uri=...)``; their bytes are not read here.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pipelines.errors import CleanError
from pipelines.readers.common import (
    COLUMNS,
    TEXT_COLUMNS,
    FirstWins,
    absolute,
    display_name,
    folder_of,
    is_empty,
    media_from,
    normalize_id,
    reject,
    shown,
    text_column,
)
from pipelines.readers.rows import (
    FORMATS,
    ROW_KEYS,
    coco_hint,
    columns_of,
    format_of,
    has_rows,
    is_blank,
    iter_rows,
    meta_value,
    parquet_schema,
    unique_columns,
    unreadable,
)
from schemas import RawSample, Reject

if TYPE_CHECKING:
    from pipelines.readers.source import SourceConfig

logger = logging.getLogger(__name__)

CHECKED_ROWS = 100  # JSON rows ``check_columns`` looks at


def iter_manifest(
    path: str, config: SourceConfig | None = None, *, name: str | None = None
) -> Iterator[RawSample | Reject]:
    """Samples and rejects of one manifest, in file order; the first of several rows with one id wins."""
    fmt = format_of(path, config.format if config else None)
    if fmt is None:
        raise ValueError(f"cannot tell the format of manifest {path!r}; set format = jsonl | json | csv | tsv | parquet")
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


def check_columns(path: str, fmt: str) -> None:
    """Raises ``ValueError`` when ``path``'s columns cannot give any sample (no ``id``, or none of text,
    image, audio) or repeat one of mbm's columns, so that a wrong file or a misnamed column stops the
    job before it starts instead of rejecting every row, or reading only one of two ``text`` columns.
    Reads the header or schema only (a header with no rows too), and of JSON the first rows: a file
    whose first rows are merely broken is left to the per-row rejects. An empty file, and one that cannot
    be read from its start, are refused too: a version of it would hold no sample (on a rerun, removing
    every one). A file damaged further on keeps the rows before the damage (``read.unreadable``)."""
    if is_blank(absolute(path)):
        raise ValueError(
            f"[input] manifest {path!r} is empty (no header, no rows): a job reading it would commit a "
            "version with no samples, removing every sample of the version before; write the manifest again "
            "(a failed export, a full disk?) or name the right file"
        )
    try:
        rows = columns_of(absolute(path), fmt, display_name(path), CHECKED_ROWS)
    except ValueError as e:  # a JSON file that is one JSON object
        raise ValueError(f"[input] manifest {path!r}: {e}") from None
    if not rows:
        if why := unreadable(absolute(path), fmt, display_name(path)):
            raise ValueError(
                f"[input] manifest {path!r}: {why.partition(': ')[2]}: a job reading it would "
                "commit a version with no samples, removing every sample of the version before; write the "
                "manifest again, or set [input] format if its extension says another format than it holds"
            )
        _check_has_rows(path, fmt)  # an empty JSON array
        return
    names = list(dict.fromkeys(column for row in rows for column in row))
    near = _near(names)
    if FORMATS[fmt] != "jsonl":  # a repeated JSON key is gone once parsed (the last wins, in any JSON reader)
        _check_repeats(path, rows[0], "schema" if FORMATS[fmt] == "parquet" else "header")
    if not any("id" in row for row in rows):
        raise ValueError(
            f"[input] manifest {path!r}: {lacking(repr('id'), rows, fmt)}{near}; every row needs an 'id' "
            "(a string or an integer, one per sample): add one, e.g. the row number or the media file's name"
            f"{coco_hint(names)}{_metadata_hint(names)}"
        )
    if not any(text_column(row) or "image" in row or "audio" in row for row in rows):
        raise ValueError(
            f"[input] manifest {path!r}: {lacking('text, image or audio', rows, fmt)}{near}; name the text column one of "
            f"{', '.join(TEXT_COLUMNS)}, and the columns of media paths image and audio"
        )
    _check_has_rows(path, fmt)  # a header or schema alone
    if FORMATS[fmt] == "parquet":
        _check_text_types(path)
    if unread := media_columns_unread(names):
        one = len(unread) == 1
        logger.warning(
            "[input] manifest %s has no 'image' or 'audio' column: %s %s read as metadata, and the media "
            "%s name%s or hold%s are not read%s", path, ", ".join(map(repr, unread)), "is" if one else "are",
            "it" if one else "they", "s" if one else "", "s" if one else "", _near(names))
    elif near:  # a Common Voice 'sentence', a LAION 'TEXT', a datasets 'labels': no text or label, and no word
        logger.warning("[input] manifest %s: some columns look like mbm's but are read as metadata%s", path, near)


def _check_text_types(path: str) -> None:
    """A Parquet manifest whose text columns hold lists of strings (several captions a row, as Flickr30k and
    COCO exports of Hugging Face datasets have them) would reject every row as ``read.bad_type``."""
    import pyarrow as pa

    schema = parquet_schema(absolute(path))
    if schema is None:
        return
    types = {name: schema.field(name).type for name in TEXT_COLUMNS if schema.get_field_index(name) >= 0}
    lists = [name for name, t in types.items() if pa.types.is_list(t) or pa.types.is_large_list(t)]
    if lists and len(lists) == len(types):
        column = lists[0]
        raise ValueError(
            f"[input] manifest {path!r}: {column!r} holds lists ({types[column]}), several texts a row as Flickr30k "
            "and COCO caption exports have them, and a sample's text is one string: write one row per text, each "
            f"with its own id (pandas: df = df.explode({column!r}); df['id'] = df['id'].astype(str) + '-' + "
            "df.groupby('id').cumcount().astype(str))")


def _check_has_rows(path: str, fmt: str) -> None:
    """A manifest without one row (a header alone, an empty JSON array, a Parquet file of 0 rows) is
    refused as an empty one is: its version would hold no sample."""
    if not has_rows(absolute(path), fmt, display_name(path)):
        raise ValueError(
            f"[input] manifest {path!r} has no rows: a job reading it would commit a version with no samples, "
            "removing every sample of the version before; write the manifest again (a failed export?) or name "
            "the right file"
        )


def _check_repeats(path: str, header: list[str], where: str) -> None:
    """A header or schema that repeats one of mbm's columns is refused: only the first would be read (an
    id or a caption in another lost). Other repeats are read as pandas reads them, and logged."""
    repeats = {name: count for name, count in Counter(header).items() if count > 1}
    ours = [name for name in repeats if name in ROW_KEYS]
    columns = listed_columns(header)
    if ours:
        times = ", ".join(f"{name!r} {repeats[name]} times" for name in ours)
        raise ValueError(
            f"[input] manifest {path!r}: its {where} repeats {'a column' if len(ours) == 1 else 'columns'} "
            f"mbm reads ({times}; columns: {columns}), and only the first of each would be read: rename or "
            "remove the others"
        )
    if repeats:
        renamed = [new for old, new in zip(header, unique_columns(header), strict=True) if old != new]
        logger.warning("[input] manifest %r: its %s repeats %s (columns: %s); the first of each keeps its "
                       "name, the others are kept in meta as %s", path, where, ", ".join(map(repr, repeats)),
                       columns, ", ".join(map(repr, renamed)))


def lacking(what: str, rows: list[list[str]], fmt: str) -> str:
    """That a table file lacks the column ``what``, with the columns it has (``rows``: ``columns_of``'s):
    its header or schema, or, in JSON, its first rows' keys."""
    names = list(dict.fromkeys(column for row in rows for column in row))
    found = listed_columns(names) or "none"
    if FORMATS[fmt] != "jsonl":
        return f"it has no {what} column (columns: {found}){_separator_hint(names, fmt)}"
    rows_read = f"none of its first {len(rows)} rows has" if len(rows) > 1 else "its first row has no"
    return f"{rows_read} {what} (keys found: {found})"


# Separators a header of one column may hide: (separator, its name, how to read such a file)
_SEPARATORS = (
    (";", "semicolons", "save it with commas (Excel: \"CSV UTF-8 (Comma delimited)\"; the CSV of many locales "
                        "uses semicolons) or convert it: pd.read_csv(path, sep=\";\").to_csv(new, index=False)"),
    ("\t", "tabs", "name it .tsv or set [input] format = \"tsv\""),
    (",", "commas", "name it .csv or set [input] format = \"csv\""),
    ("|", "bars", "convert it to commas: pd.read_csv(path, sep=\"|\").to_csv(new, index=False)"),
)


def _separator_hint(names: list[str], fmt: str) -> str:
    """For a CSV/TSV header read as one column: the separator it holds and how to read such a file."""
    if len(names) != 1:
        return ""
    own = "\t" if fmt == "tsv" else ","
    for separator, called, fix in _SEPARATORS:
        if separator != own and separator in names[0]:
            return f"; its header is one column holding {separator!r}: a file separated by {called}? {fix}"
    return ""


def listed_columns(names: list[str], limit: int = 20) -> str:
    """The first ``limit`` names (columns, files), quoted so that a space or a quote in one shows."""
    return ", ".join(map(repr, names[:limit])) + (", ..." if len(names) > limit else "")


# What other tools name mbm's columns (compared lower-case, without spaces and quotes): NeMo's ASR
# manifests (audio_filepath), Common Voice (path, sentence), LAION/img2dataset (url is a download, not
# listed), COCO-style exports (file_name, image_path), Hugging Face audiofolder metadata (file_name)
ALIASES = {
    "id": ("key", "uid", "sample_id", "idx"),  # idx: GLUE and other datasets exports
    # img2dataset's parquet output holds each image's bytes in a column named by its format (jpg)
    "audio": ("audio_filepath", "audio_path", "audio_file", "wav", "wav_path", "audiopath", "sound", "flac", "mp3"),
    "image": ("image_path", "image_file", "img", "img_path", "imagepath", "picture", "photo", "jpg", "jpeg", "png",
              "webp"),
    "text": ("sentence", "transcript", "utterance", "prompt", "description", "alt_text", "normalized_text"),
    "label": ("labels", "class", "class_label", "category", "fine_label", "coarse_label"),
    "image or audio": ("file_name", "filename", "filepath", "file_path", "file", "path"),
}
_ALIAS = {alias: want for want, aliases in ALIASES.items() for alias in aliases}
_MEDIA_ALIASES = ("image", "audio", "image or audio")


def _plain(name: str) -> str:
    """A column name as near misses and aliases are compared: lower-case, without surrounding spaces or quotes."""
    return name.strip(" \t\"'").lower()


def _near(names: list[str]) -> str:
    """'; did you mean ...' for the columns that would be mbm's but for case, surrounding spaces or quotes
    (a TSV header is not unquoted), or that other tools name so (``ALIASES``), where mbm's is missing."""
    near = {name: _plain(name) for name in names if name not in ROW_KEYS}
    pairs = [f"{want!r} (not {name!r})" for name, want in near.items() if want in ROW_KEYS]
    pairs += _aliased(names, near)
    if not pairs:
        return ""
    return f"; did you mean {', '.join(pairs)}? column names are matched exactly"


def _aliased(names: list[str], near: dict[str, str]) -> list[str]:
    """``"'audio' (not 'audio_filepath')"`` for each column another tool's name for a missing column of mbm's."""
    present = {want for want in near.values() if want in ROW_KEYS} | set(names)
    has_text = any(c in present for c in TEXT_COLUMNS)
    out = []
    for name, lowered in near.items():
        want = _ALIAS.get(lowered)
        if want is None or (want == "text" and has_text) or want in present:
            continue
        if want == "image or audio" and ("image" in present or "audio" in present):
            continue
        out.append(f"{want!r} (not {name!r})" if want != "image or audio" else f"'image' or 'audio' (not {name!r})")
    return out


def _metadata_hint(names: list[str]) -> str:
    """For a table that names its files by ``file_name`` and has no ``id``: what it looks like."""
    if "file_name" not in names:
        return ""
    return ("; 'file_name' is how the metadata file of an imagefolder/audiofolder names its files: as "
            "metadata.csv (or .jsonl, .parquet) beside them, read the folder with [input] folder")


def media_columns_unread(names: list[str]) -> list[str]:
    """The columns of ``names`` that other tools use for media paths, where the manifest has no ``image``
    and no ``audio`` column: read as metadata, their files would silently not be read."""
    if "image" in names or "audio" in names:
        return []
    return [n for n in names if _ALIAS.get(_plain(n)) in _MEDIA_ALIASES]


def row_sample(sample_id: str, row: dict[str, Any], source: str, base: str, allow_outside: bool) -> RawSample:
    """The sample for one manifest row; raises ``CleanError`` for wrong types, escaping paths, no modality."""
    column = text_column(row)
    text = text_cell(row.get(column), source, column) if column else None
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
        meta={key: meta_value(value) for key, value in row.items() if key not in COLUMNS and key != column},
        source=source,
    )


def text_cell(value: Any, source: str, column: str) -> str | bytes | None:
    """A text cell: ``str`` (``bytes`` from a Parquet binary column), None when empty."""
    if is_empty(value):
        return None
    if not isinstance(value, (str, bytes)):
        raise CleanError("read.bad_type", f"{source}: '{column}' is {shown(value)}, expected a string")
    return value
