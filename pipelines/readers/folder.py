"""Hugging Face imagefolder / audiofolder reader.

With ``metadata.jsonl`` / ``metadata.csv`` / ``metadata.parquet`` (at the root or in subfolders, each
naming files relative to its own folder by ``file_name``): one sample per metadata row, and one
``read.not_in_metadata`` reject per image or audio file that no row names (a split shipped without
metadata, a file added after the metadata was written), so that none vanishes without a row; a file
reached through a symlinked folder is named when its real path is. Other files are not samples there
and are left alone. Without metadata: one sample per media file, labelled by its class folder when
files sit in more than one class folder, its text taken from a ``.txt`` file of the same name beside it
(``img.png`` + ``img.txt``: img2dataset's ``files`` output, caption folders) and its metadata from a
``.json`` file of that name, read as a tar's json member is; and one ``read.unsupported_file`` reject
per other file, so that a photo in a format mbm does not read (``.heic``) or a stray file is listed
rather than silently left out. Folders whose media files all have a ``.json`` with img2dataset's
fields are its shards (``00000/``, ``00001/``), not classes. Hidden files and folders and the thumbnail
and settings files Windows and macOS leave behind are skipped.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pipelines.errors import CleanError
from pipelines.media import read_media
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
    text_column,
)
from pipelines.readers.manifest import text_cell
from pipelines.readers.rows import format_of, iter_rows, meta_value
from pipelines.readers.wds import json_object, with_json
from schemas import Media, RawSample, Reject

if TYPE_CHECKING:
    from pipelines.readers.source import SourceConfig

METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
# without metadata, the files that hold the text and the metadata of the media files of the same name
TEXT_EXTENSION, INFO_EXTENSION = "txt", "json"
PARTNERS = {TEXT_EXTENSION: "text", INFO_EXTENSION: "metadata"}
# fields img2dataset writes into each sample's .json: with them beside every media file, folders are shards
IMG2DATASET_FIELDS = ("key", "status")
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
    named: set[str] = set()  # the paths metadata rows resolve to
    damaged: set[str] = set()  # metadata files with rows that could not be read
    for rel in metadata:
        yield from _metadata_samples(root, rel, allow_outside, seen, named, damaged)
    yield from _not_in_metadata(root, files, metadata, named, damaged)


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
    root: str, rel: str, allow_outside: bool, seen: FirstWins, named: set[str], damaged: set[str]
) -> Iterator[RawSample | Reject]:
    """The samples of one metadata file, adding the paths its rows name to ``named``; one that cannot
    be read (a broken symlink, a pipe, a cut Parquet file) is one ``read.unreadable`` reject from
    ``iter_rows``."""
    subdir = posixpath.dirname(rel)
    base = f"{root}/{subdir}" if subdir else root
    for item in iter_rows(f"{root}/{rel}", format_of(rel) or "", rel):
        if isinstance(item, Reject):
            damaged.add(rel)
            yield item
            continue
        line, row = item
        source = f"{rel}:{line}"
        sample_id = None
        try:
            file_name = _file_name(row.get("file_name"), source)
            sample_id = f"{subdir}/{file_name}" if subdir else file_name
            kind = _kind(file_name, source)
            uri = resolve_media(file_name, base, allow_outside, source, "file_name")
            named.add(uri)
            sample = _row_sample(sample_id, row, source, kind, Media(uri=uri, name=file_name))
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


def _kind(file_name: str, source: str) -> str:
    kind = media_kind(file_name)
    if kind is None:
        raise CleanError(
            "read.unsupported_file", f"{source}: {file_name!r} is neither an image nor an audio file"
        )
    return kind


def _row_sample(sample_id: str, row: dict[str, Any], source: str, kind: str, media: Media) -> RawSample:
    column = text_column(row)
    used = {"file_name", "label", column}
    label = row.get("label")
    return RawSample(
        id=sample_id,
        text=text_cell(row.get(column), source, column) if column else None,
        label=None if is_empty(label) else meta_value(label),
        meta={key: meta_value(value) for key, value in row.items() if key not in used},
        source=source,
        **{kind: media},
    )


def _not_in_metadata(
    root: str, files: list[str], metadata: list[str], named: set[str], damaged: set[str]
) -> Iterator[Reject]:
    """A ``read.not_in_metadata`` reject per image or audio file that no metadata row names: with
    metadata, the rows are the samples, and such a file would otherwise vanish without a row. Other
    files (a README, a licence) are not samples here and are left alone, as before."""
    covering: dict[str, list[str]] = {}  # folder -> its metadata files
    for rel in metadata:
        covering.setdefault(posixpath.dirname(rel), []).append(rel)
    real = _RealPaths(root, named)
    for rel in files:
        if media_kind(rel) is not None and posixpath.join(root, rel) not in named and rel not in real:
            yield _unnamed(rel, covering, damaged)


class _RealPaths:
    """Whether a listed file of a local dataset is named by its real path: the walk lists a file in a
    symlinked folder once, under one of its paths (``link/r.png``), and a row may name another
    (``real/r.png``). Only folders are resolved, each once, and only once a listed file is not named
    as it is; remote file systems have no symlinks."""

    def __init__(self, root: str, named: set[str]) -> None:
        self._root = root
        self._named = named
        self._real: set[str] | None = None
        self._folders: dict[str, str] = {}

    def __contains__(self, rel: str) -> bool:
        if local_path(self._root) is None:
            return False
        if self._real is None:
            self._real = {self._resolve(path) for path in self._named if local_path(path) is not None}
        return self._resolve(posixpath.join(self._root, rel)) in self._real

    def _resolve(self, path: str) -> str:
        folder, name = os.path.split(local_path(path) or path)
        if folder not in self._folders:
            self._folders[folder] = os.path.realpath(folder)
        return os.path.join(self._folders[folder], name)


def _unnamed(rel: str, covering: dict[str, list[str]], damaged: set[str]) -> Reject:
    """The reject of a media file no row names, saying which metadata file would name it."""
    folder = posixpath.dirname(rel)
    while folder not in covering and folder:
        folder = posixpath.dirname(folder)
    if folder not in covering:
        every = sorted(f for files in covering.values() for f in files)
        listed = ", ".join(every[:3]) + (", ..." if len(every) > 3 else "")
        detail = (
            f"{rel}: not read as a sample: no metadata file covers its folder "
            f"({posixpath.dirname(rel) or 'the dataset root'}), and with metadata ({listed}) only the files "
            "their rows name are read; add a metadata file there with a row for it, or move the file out "
            "of the dataset folder"
        )
    else:
        meta = " or ".join(covering[folder])
        name = rel[len(folder) + 1 :] if folder else rel
        unread = ""
        if damaged.intersection(covering[folder]):
            unread = " (some of its rows could not be read: see their rejects)"
        detail = (
            f"{rel}: not read as a sample: no row of {meta} names it{unread}; add a row with "
            f"file_name {name!r} there, or move the file out of the dataset folder"
        )
    return reject("read.not_in_metadata", detail, rel, rel)


def _file_samples(root: str, files: list[str]) -> Iterator[RawSample | Reject]:
    kinds = [(rel, media_kind(rel)) for rel in files if posixpath.basename(rel).lower() not in CLUTTER_NAMES]
    parents = {posixpath.basename(posixpath.dirname(rel)) for rel, kind in kinds if kind}
    in_folders = all("/" in rel for rel, kind in kinds if kind)
    partners = _partners(kinds)
    texts, infos = partners[TEXT_EXTENSION], partners[INFO_EXTENSION]
    labelled = (
        in_folders and len(parents) > 1 and not parents <= SPLIT_NAMES and not _shards(root, kinds, infos)
    )
    bad_infos: set[str] = set()  # .json files already rejected (one may serve an image and an audio file)
    for rel, kind in kinds:
        stem = posixpath.splitext(rel)[0]
        if kind is None:
            partner = partners.get(extension(rel), {}).get(stem)
            if partner != rel:
                yield _unsupported(rel, partner)
            continue
        split = rel.split("/", 1)[0] if "/" in rel else ""
        parent = posixpath.basename(posixpath.dirname(rel))
        try:
            text = _text_file(root, texts[stem]) if stem in texts else None
        except CleanError as e:
            detail = f"{rel}: its text file {texts[stem]} cannot be read ({e.detail})"
            yield reject(e.reason, detail, rel, rel)
            continue
        label = parent if labelled and parent not in SPLIT_NAMES else None
        meta: dict[str, Any] = {}
        if stem in infos:
            try:
                text, label, meta = with_json(_info_file(root, infos[stem]), text, label, infos[stem])
            except CleanError as e:
                if infos[stem] not in bad_infos:
                    bad_infos.add(infos[stem])
                    yield _bad_info(infos[stem], e)
        if split in SPLIT_NAMES:
            meta["split"] = split
        media = Media(uri=f"{root}/{rel}", name=rel)
        yield RawSample(id=rel, text=text, label=label, meta=meta, source=rel, **{kind: media})


def _partners(kinds: list[tuple[str, str | None]]) -> dict[str, dict[str, str]]:
    """For ``.txt`` and ``.json``: path without extension -> the file beside the media files of that name
    that holds their text or metadata (img2dataset's ``files`` output, caption folders); with an image
    and an audio file of one name, both take it."""
    media = {posixpath.splitext(rel)[0] for rel, kind in kinds if kind}
    partners: dict[str, dict[str, str]] = {ext: {} for ext in PARTNERS}
    for rel, kind in kinds:
        stem, ext = posixpath.splitext(rel)[0], extension(rel)
        if kind is None and ext in partners and stem in media:
            partners[ext].setdefault(stem, rel)  # a.TXT before a.txt: the other one is a reject
    return partners


def _shards(root: str, kinds: list[tuple[str, str | None]], infos: dict[str, str]) -> bool:
    """Whether the folders are img2dataset's shards (``00000/``, ``00001/``), not classes: every media
    file has a ``.json`` and each that can be read holds img2dataset's fields. Reads the ``.json`` files
    (again when their samples are read) until one does not; only for a dataset that could be labelled."""
    stems = dict.fromkeys(posixpath.splitext(rel)[0] for rel, kind in kinds if kind)
    if not all(stem in infos for stem in stems):
        return False
    for stem in stems:
        try:
            info = _info_file(root, infos[stem])
        except CleanError:
            continue  # its reject comes with its sample
        if not all(field in info for field in IMG2DATASET_FIELDS):
            return False
    return True


def _text_file(root: str, rel: str) -> bytes | None:
    """A text file's bytes, decoded strictly by the text cleaner as a tar's ``.txt`` is; None when empty."""
    try:
        return read_media(Media(uri=f"{root}/{rel}", name=rel))
    except CleanError as e:
        if e.reason == "file.empty":
            return None
        raise


def _info_file(root: str, rel: str) -> dict[str, Any]:
    """A ``.json`` file's object, as a tar's json member is read; ``CleanError`` when it cannot be read or
    is not a JSON object."""
    try:
        data = read_media(Media(uri=f"{root}/{rel}", name=rel))
    except CleanError as e:
        if e.reason != "file.empty":
            raise CleanError(e.reason, f"{rel} cannot be read ({e.detail})") from e
        data = b""
    return json_object(data, rel)


def _bad_info(rel: str, error: CleanError) -> Reject:
    """The reject of a ``.json`` that cannot be used: its media files are read without it, so that a
    damaged metadata file does not cost the samples."""
    stem = posixpath.basename(posixpath.splitext(rel)[0])
    detail = (
        f"{error.detail}; the image or audio files named '{stem}.*' beside it are read without it: fix the "
        "file, or remove it"
    )
    return reject(error.reason, detail, rel, rel)


def _unsupported(rel: str, partner: str | None = None) -> Reject:
    ext = extension(rel)
    stem = posixpath.basename(posixpath.splitext(rel)[0])
    if ext in PARTNERS and partner is not None:
        what = f"{partner} already holds the {PARTNERS[ext]} of the image or audio files named '{stem}.*'"
    elif ext in PARTNERS:
        what = f"no image or audio file named '{stem}.*' beside it, whose {PARTNERS[ext]} it would be"
    elif ext:
        what = f"'.{ext}' is not an image or audio extension mbm reads"
    else:
        what = "it has no extension"
    return reject("read.unsupported_file", f"{rel}: not read as a sample ({what})", rel, rel)
