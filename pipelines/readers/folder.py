"""Hugging Face imagefolder / audiofolder reader.

With ``metadata.jsonl`` / ``metadata.csv`` / ``metadata.parquet`` (at the root or in subfolders, each
naming files relative to its own folder by ``file_name``): one sample per metadata row. Without: one
sample per media file, labelled by its class folder when files sit in more than one class folder, and
one ``read.unsupported_file`` reject per other file, so that a photo in a format mbm does not read
(``.heic``) or a stray file is listed rather than silently left out. Hidden files and folders and the
thumbnail and settings files Windows and macOS leave behind are skipped.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pipelines.errors import CleanError
from pipelines.readers.common import (
    FirstWins,
    absolute,
    extension,
    is_empty,
    local_path,
    media_kind,
    reject,
    resolve_media,
    shown,
)
from pipelines.readers.manifest import text_cell
from pipelines.readers.rows import format_of, iter_rows, meta_value
from schemas import Media, RawSample, Reject

if TYPE_CHECKING:
    from pipelines.readers.source import SourceConfig

METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
TEXT_COLUMNS = ("text", "caption", "transcription")  # the first one present is the text
# folders HF reads as splits, not classes
SPLIT_NAMES = frozenset({"train", "training", "test", "testing", "validation", "valid", "val", "dev", "eval"})
# files the system writes into any folder it shows (compared lower-case); not part of a dataset
CLUTTER_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r"})


def iter_folder(root: str, config: SourceConfig | None = None) -> Iterator[RawSample | Reject]:
    """Samples and rejects of an imagefolder/audiofolder, metadata files (root first) or files in path order."""
    root = absolute(root).rstrip("/") or "/"
    files = list_files(root)
    metadata = sorted((f for f in files if posixpath.basename(f) in METADATA_NAMES), key=_depth_first)
    if not metadata:
        yield from _file_samples(root, files)
        return
    allow_outside = bool(config and config.allow_outside)
    seen = FirstWins()
    for rel in metadata:
        yield from _metadata_samples(root, rel, allow_outside, seen)


def list_files(root: str) -> list[str]:
    """Paths under ``root`` relative to it, sorted, hidden (``.x``, ``__x``) files and folders left out.

    A local folder is walked with ``os.walk``, so a broken symlink or a symlink to itself is listed
    and becomes a reject when read (Beam's listing drops any entry whose size it cannot read, and such
    a file would vanish without a row). Symlinked folders are entered (a class folder linked from
    elsewhere), each real folder once: a link back up the tree, or a second link to a folder already
    listed, is not walked again.
    """
    local = local_path(root)
    if local is not None:
        prefix = local.rstrip("/") + "/"
        rels = (posixpath.join(folder, name)[len(prefix):] for folder, names in _walk(local) for name in names)
    else:
        from apache_beam.io.filesystems import FileSystems

        (result,) = FileSystems.match([root.rstrip("/") + "/**"])
        prefix = root.rstrip("/") + "/"
        rels = (m.path[len(prefix) :] for m in result.metadata_list if m.path.startswith(prefix))
    return sorted(r for r in rels if not any(part.startswith((".", "__")) for part in r.split("/")))


def _walk(local: str) -> Iterator[tuple[str, list[str]]]:
    """(folder, file names) under ``local``, following symlinked folders, each real folder once, in name order."""
    seen: set[str] = set()
    for folder, dirs, names in os.walk(local, followlinks=True):
        dirs.sort()
        real = os.path.realpath(folder)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        yield folder, names


def _depth_first(rel: str) -> tuple[int, str]:
    return rel.count("/"), rel


def _metadata_samples(
    root: str, rel: str, allow_outside: bool, seen: FirstWins
) -> Iterator[RawSample | Reject]:
    """The samples of one metadata file; one that cannot be read (a broken symlink, a pipe, a cut
    Parquet file) is one ``read.unreadable`` reject from ``iter_rows``."""
    subdir = posixpath.dirname(rel)
    base = f"{root}/{subdir}" if subdir else root
    for item in iter_rows(f"{root}/{rel}", format_of(rel) or "", rel):
        if isinstance(item, Reject):
            yield item
            continue
        line, row = item
        source = f"{rel}:{line}"
        sample_id = None
        try:
            file_name = _file_name(row.get("file_name"), source)
            sample_id = f"{subdir}/{file_name}" if subdir else file_name
            sample = _row_sample(sample_id, file_name, row, source, base, allow_outside)
        except CleanError as e:
            yield reject(e.reason, e.detail, source, sample_id)
            continue
        yield seen.check(sample_id, source) or sample


def _file_name(value: Any, source: str) -> str:
    if is_empty(value):
        raise CleanError("read.missing_id", f"{source}: no 'file_name'")
    if not isinstance(value, str):
        raise CleanError("read.bad_type", f"{source}: 'file_name' is {shown(value)}, expected a path string")
    return value


def _row_sample(
    sample_id: str, file_name: str, row: dict[str, Any], source: str, base: str, allow_outside: bool
) -> RawSample:
    kind = media_kind(file_name)
    if kind is None:
        raise CleanError(
            "read.unsupported_file", f"{source}: {file_name!r} is neither an image nor an audio file"
        )
    media = Media(uri=resolve_media(file_name, base, allow_outside, source, "file_name"), name=file_name)
    text_column = next((c for c in TEXT_COLUMNS if c in row), None)
    used = {"file_name", "label", text_column}
    label = row.get("label")
    return RawSample(
        id=sample_id,
        text=text_cell(row.get(text_column), source, text_column) if text_column else None,
        label=None if is_empty(label) else meta_value(label),
        meta={key: meta_value(value) for key, value in row.items() if key not in used},
        source=source,
        **{kind: media},
    )


def _file_samples(root: str, files: list[str]) -> Iterator[RawSample | Reject]:
    kinds = [(rel, media_kind(rel)) for rel in files if posixpath.basename(rel).lower() not in CLUTTER_NAMES]
    parents = {posixpath.basename(posixpath.dirname(rel)) for rel, kind in kinds if kind}
    in_folders = all("/" in rel for rel, kind in kinds if kind)
    labelled = in_folders and len(parents) > 1 and not parents <= SPLIT_NAMES
    for rel, kind in kinds:
        if kind is None:
            yield _unsupported(rel)
            continue
        split = rel.split("/", 1)[0] if "/" in rel else ""
        parent = posixpath.basename(posixpath.dirname(rel))
        yield RawSample(
            id=rel,
            label=parent if labelled and parent not in SPLIT_NAMES else None,
            meta={"split": split} if split in SPLIT_NAMES else {},
            source=rel,
            **{kind: Media(uri=f"{root}/{rel}", name=rel)},
        )


def _unsupported(rel: str) -> Reject:
    ext = extension(rel)
    what = f"'.{ext}' is not an image or audio extension mbm reads" if ext else "it has no extension"
    return reject("read.unsupported_file", f"{rel}: not read as a sample ({what})", rel, rel)
