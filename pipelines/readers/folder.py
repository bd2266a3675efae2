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
rather than silently left out; a ``.txt`` or ``.json`` that cannot be used is a reject of its own, and
its media files are read without it. Folders all named by digits of one width of five or more, beside
img2dataset's ``.json`` or ``_stats.json`` files, are its shards (``00000/``, ``00001/``), not classes. Hidden files and folders, folders named
``__x`` (``__MACOSX``, ``__pycache__``) and the thumbnail and settings files Windows and macOS leave
behind are skipped.

``check_metadata`` refuses, before the job starts, a metadata file with no ``file_name`` column.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pipelines.clean.formats import FIX, UNREAD_EXTENSIONS
from pipelines.errors import CleanError
from pipelines.media import read_media, remote_stamp
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
from pipelines.readers.manifest import CHECKED_ROWS, lacking, listed_columns, text_cell
from pipelines.readers.rows import columns_of, format_of, is_blank, iter_rows, meta_value
from pipelines.readers.wds import json_object, with_json
from schemas import Media, RawSample, Reject
from schemas.manifest import SPLIT_NAMES

if TYPE_CHECKING:
    from pipelines.readers.source import SourceConfig

logger = logging.getLogger(__name__)

METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
# column names meant as file_name (compared lower-case, letters and digits only): a did-you-mean for them
FILE_NAME_NEAR = frozenset({"filename", "file", "filepath", "path", "image", "imagepath", "imagefile", "img",
                            "audio", "audiopath", "audiofile"})
# without metadata, the files that hold the text and the metadata of the media files of the same name
TEXT_EXTENSION, INFO_EXTENSION = "txt", "json"
# LibriSpeech's per-chapter transcripts (19-198.trans.txt: '19-198-0000 TEXT' lines), said what they are
TRANSCRIPTS = ".trans"
PARTNERS = {TEXT_EXTENSION: "text", INFO_EXTENSION: "metadata"}
UNREAD_FILES = "unread_files"  # meta key: the dotted .txt files beside a media file that did not give its text
# img2dataset names its shard folders {shard:05d}: folders all named so are shards, not classes
SHARD_FOLDER = re.compile(r"[0-9]{5,}")
# prefixes of the folders (and, but for "__", files) that are not part of a dataset: .git, __MACOSX
SKIPPED_FOLDERS, SKIPPED_FILES = (".", "__"), "."
# SPLIT_NAMES: folders HF reads as splits, not classes; a sample under one records it as its split (``mbm
# train --split-by split`` trains on train and training and holds out the others: mbm.data.split)
# files the system writes into any folder it shows (compared lower-case); not part of a dataset
CLUTTER_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r"})


def iter_folder(root: str, config: SourceConfig | None = None) -> Iterator[RawSample | Reject]:
    """Samples and rejects of an imagefolder/audiofolder, metadata files (root first) or files in path order."""
    root = absolute(root).rstrip("/") or "/"
    stamps: dict[str, str] = {}  # a remote folder's objects
    files = list_files(root, stamps)
    metadata = _metadata_files(files)
    if not metadata:
        yield from _file_samples(root, files, stamps)
        return
    allow_outside = bool(config and config.allow_outside)
    seen = FirstWins()
    named: set[str] = set()  # the paths metadata rows resolve to
    damaged: set[str] = set()  # metadata files with rows that could not be read
    for rel in metadata:
        yield from _metadata_samples(root, rel, allow_outside, seen, named, damaged, stamps)
    yield from _not_in_metadata(root, files, metadata, named, damaged)


def check_metadata(folder: str) -> None:
    """Raises ``ValueError`` when a metadata file of ``folder`` has no ``file_name`` column, so that a
    misnamed column (``filename``) stops the job before it starts instead of giving an empty version,
    a ``read.missing_id`` row per row and a ``read.not_in_metadata`` row per file; and when the folder
    holds neither a metadata file nor a media file (an empty folder, a ``save_to_disk`` folder of
    Hugging Face datasets): a version read from it would hold no sample and remove every earlier one. Reads headers,
    schemas and the first rows of JSON only; a file that cannot be read is left to its reject."""
    root = absolute(folder).rstrip("/") or "/"
    files = list_files(root)
    metadata = _metadata_files(files)
    if not metadata and not any(media_kind(rel) for rel in files):
        raise ValueError(_no_media(folder, files))
    for rel in metadata:
        fmt = format_of(rel) or ""
        where = f"[input] folder metadata file {posixpath.join(folder, rel)!r}"
        try:
            rows = columns_of(f"{root}/{rel}", fmt, rel, CHECKED_ROWS)
        except ValueError as e:  # a JSON file that is one JSON object
            raise ValueError(f"{where}: {e}") from None
        if not rows and is_blank(f"{root}/{rel}"):
            raise ValueError(
                f"{where} is empty (no header, no rows): a version read from it would hold none of the files "
                "it should name (a failed export, a full disk?); write it again, or remove it"
            )
        if not rows or any("file_name" in row for row in rows):
            continue
        names = list(dict.fromkeys(column for row in rows for column in row))
        raise ValueError(
            f"{where}: {lacking(repr('file_name'), rows, fmt)}{_near_file_name(names)}; each row names its image "
            "or audio file by 'file_name', "
            "a path relative to the metadata file's folder: rename the column, or add it"
        )


def _no_media(folder: str, files: list[str]) -> str:
    """Why ``folder`` gives no sample, with what it holds and what to read instead where that shows."""
    what = (f"{len(files)} other file{'s' if len(files) > 1 else ''}: {listed_columns(files, 5)}" if files
            else "no files (hidden ones are left out)")
    if any(extension(rel) == "tar" for rel in files) and not saved_to_disk(files):
        hint = "; for WebDataset tars, use [input] shards = the folder"
    else:
        hint = tables_hint(folder, files)
    return (f"[input] folder {folder!r} holds no image or audio file and no metadata file ({what}){hint}; "
            "an imagefolder/audiofolder is read by the media files' extensions")


def saved_to_disk(files: list[str]) -> bool:
    """Whether a folder's ``files`` are what Hugging Face datasets' ``save_to_disk`` writes."""
    names = {posixpath.basename(rel) for rel in files}
    return any(extension(rel) == "arrow" for rel in files) and bool(names & {"state.json", "dataset_info.json"})


def tables_hint(folder: str, files: list[str]) -> str:
    """'; ...' saying how to read the tables among a folder's ``files`` (paths relative to it) as a
    manifest, which is one file; "" where it holds none."""
    if saved_to_disk(files):
        return ("; this is a Hugging Face datasets folder written by save_to_disk: export it, "
                "datasets.load_from_disk(path).to_parquet(\"data.parquet\") (media as {bytes, path} structs), "
                "and read that with [input] manifest = \"data.parquet\"")
    tables = sorted(rel for rel in files if format_of(rel))
    if not tables:
        return ""
    if len(tables) == 1:
        return f"; to read a table of samples, use [input] manifest = {posixpath.join(folder, tables[0])!r}"
    return (f"; it holds {len(tables)} tables ({listed_columns(tables, 4)}) and a manifest is one file: join those of the split you "
            "want into one (JSON Lines with cat, CSV/TSV with cat keeping the first header line only, Parquet with "
            "pyarrow.parquet.write_table(pyarrow.parquet.read_table(sorted(glob.glob('train-*.parquet'))), "
            "'train.parquet')) and read it with [input] manifest")


def _near_file_name(names: list[str]) -> str:
    """'; did you mean ...' for the columns most likely meant as ``file_name`` (``filename``, ``path``)."""
    near = [name for name in names if re.sub(r"[^0-9a-z]", "", name.lower()) in FILE_NAME_NEAR]
    if not near:
        return ""
    names_shown = " or ".join(map(repr, near))
    return f"; did you mean 'file_name' (not {names_shown})? column names are matched exactly"


def _metadata_files(files: list[str]) -> list[str]:
    """The metadata files among ``files``, the root's first."""
    return sorted((f for f in files if posixpath.basename(f) in METADATA_NAMES), key=_depth_first)


def list_files(root: str, stamps: dict[str, str] | None = None) -> list[str]:
    """Paths under ``root`` relative to it, sorted; hidden files (``.x``) and hidden or ``__x`` folders
    (``.git``, ``__MACOSX``) left out. A file named ``__x`` is read as any other. A remote folder's
    objects' stamps (``remote_stamp``: the size and update time its listing gives) go to ``stamps``, by
    URI, so that a re-run need not read them again to know they did not change.

    A local folder is walked with ``os.walk``, so a broken symlink or a symlink to itself is listed
    and becomes a reject when read (Beam's listing drops any entry whose size it cannot read, and such
    a file would vanish without a row). Symlinked folders outside the root are entered (a class folder
    linked from elsewhere), each real folder once; one whose real folder is inside the root is not
    (see ``_walk``).
    """
    local = local_path(root)
    if local is not None:
        prefix = local.rstrip("/") + "/"
        rels = (posixpath.join(folder, name)[len(prefix):] for folder, names in _walk(local) for name in names)
    else:
        from apache_beam.io.filesystems import FileSystems

        (result,) = FileSystems.match([root.rstrip("/") + "/**"])
        prefix = root.rstrip("/") + "/"
        listed = [m for m in result.metadata_list if m.path.startswith(prefix)]
        if stamps is not None:
            stamps.update((m.path, stamp) for m in listed
                          if (stamp := remote_stamp(m.path, m.size_in_bytes, m.last_updated_in_seconds)))
        rels = (m.path[len(prefix) :] for m in listed)
    return sorted(r for r in rels if _kept(r))


def _kept(rel: str) -> bool:
    *folders, name = rel.split("/")
    return not name.startswith(SKIPPED_FILES) and _kept_folders(folders)


def _kept_folders(folders: list[str]) -> bool:
    return not any(folder.startswith(SKIPPED_FOLDERS) for folder in folders)


def _walk(local: str) -> Iterator[tuple[str, list[str]]]:
    """(folder, file names) under ``local`` in name order, following symlinked folders, each real folder
    once. A symlinked folder whose real folder is walked under its own name (inside the root, not in a
    skipped folder) is not entered: ``latest -> train`` sorts first and would take over train's samples,
    their ids, labels and split. Skipped folders are not walked at all."""
    top = os.path.realpath(local)
    seen: set[str] = set()
    for folder, dirs, names in os.walk(local, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if _kept_folders([d]) and not _walked(folder, d, top))
        yield folder, names


def _walked(folder: str, name: str, top: str) -> bool:
    """Whether ``folder/name`` is a symlink to a folder that the walk of ``top`` reaches by its own name."""
    path = os.path.join(folder, name)
    if not os.path.islink(path):
        return False
    real, prefix = os.path.realpath(path), top.rstrip("/") + "/"
    return real == top or (real.startswith(prefix) and _kept_folders(real[len(prefix) :].split("/")))


def _depth_first(rel: str) -> tuple[int, str]:
    return rel.count("/"), rel


def _metadata_samples(
    root: str, rel: str, allow_outside: bool, seen: FirstWins, named: set[str], damaged: set[str],
    stamps: dict[str, str],
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
            file_name = _file_name(row.get("file_name"), source, base)
            sample_id = f"{subdir}/{file_name}" if subdir else file_name
            kind = _kind(file_name, source)
            uri = resolve_media(file_name, base, allow_outside, source, "file_name")
            named.add(uri)
            media = Media(uri=uri, name=file_name, stamp=stamps.get(uri))
            sample = _row_sample(sample_id, row, source, kind, media)
            _record_split(sample)
        except CleanError as e:
            yield reject(e.reason, e.detail, source, sample_id)
            continue
        yield seen.check(sample_id, source) or sample


def _file_name(value: Any, source: str, base: str) -> str:
    """The row's ``file_name``; spaces around it (a spreadsheet's export) are dropped unless a file of
    ``base`` is named with them."""
    if is_empty(value):
        raise CleanError("read.missing_id", f"{source}: no 'file_name'")
    if not isinstance(value, str):
        raise CleanError("read.bad_type", f"{source}: 'file_name' is {shown(value)}, expected a path string")
    if value != value.strip() and not os.path.lexists(os.path.join(local_path(base) or base, value)):
        return value.strip()
    return value


def _kind(file_name: str, source: str) -> str:
    kind = media_kind(file_name)
    if kind is None:
        unread = _unread_format(extension(file_name))
        raise CleanError(
            "read.unsupported_file",
            f"{source}: {file_name!r} is " + (unread or "neither an image nor an audio file"),
        )
    return kind


def _unread_format(ext: str) -> str | None:
    """What a file of an image, audio or video format that the cleaners do not decode is, and what to do."""
    kind = UNREAD_EXTENSIONS.get(ext)
    if kind is None:
        return None
    return f"{'an' if kind[0] in 'ai' else 'a'} {kind} format mbm does not decode ('.{ext}'): {FIX[kind]}"


def _record_split(sample: RawSample) -> None:
    """A sample under a split folder (``train/``, ``test/``) records it, as without metadata, unless its
    row has a ``split`` of its own."""
    top = sample.id.split("/", 1)[0] if "/" in sample.id else ""
    if top in SPLIT_NAMES and "split" not in sample.meta:
        sample.meta["split"] = top


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
    """Whether a listed file of a local dataset is named by its real path: the walk lists a file once,
    under one of its paths (``real/r.png``, or ``link/r.png`` for a folder linked from outside the
    root), and a row may name another (``link/r.png``). Only folders are resolved, each once, and only
    once a listed file is not named as it is; remote file systems have no symlinks."""

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


def _file_samples(root: str, files: list[str], stamps: dict[str, str]) -> Iterator[RawSample | Reject]:
    """The samples of a folder without metadata, one per media file, with the text and metadata of the
    ``.txt`` and ``.json`` beside it; one of those that cannot be used is a reject of its own, read once
    (one may serve an image and an audio file), and its media files are read without it."""
    kinds = [(rel, media_kind(rel)) for rel in files if posixpath.basename(rel).lower() not in CLUTTER_NAMES]
    parents = {posixpath.basename(posixpath.dirname(rel)) for rel, kind in kinds if kind}
    in_folders = all("/" in rel for rel, kind in kinds if kind)
    partners = _partners(kinds)
    texts, infos = partners[TEXT_EXTENSION], partners[INFO_EXTENSION]
    variants = _text_variants(kinds, texts)
    in_variants = {rel for names in variants.values() for rel in names}
    labelled = (in_folders and len(parents) > 1 and not parents <= SPLIT_NAMES
                and not _shards(root, parents, files, bool(partners[INFO_EXTENSION])))
    bad: set[str] = set()  # .txt and .json files already rejected
    for rel, kind in kinds:
        stem = posixpath.splitext(rel)[0]
        if kind is None:
            partner = partners.get(extension(rel), {}).get(stem)
            if partner != rel and rel not in in_variants:
                yield _unsupported(rel, partner)
            continue
        split = rel.split("/", 1)[0] if "/" in rel else ""
        parent = posixpath.basename(posixpath.dirname(rel))
        text: str | bytes | None = None
        label = parent if labelled and parent not in SPLIT_NAMES else None
        meta: dict[str, Any] = {}
        if stem in texts:
            try:
                text = _partner_file(root, texts[stem])
            except CleanError as e:
                yield from _bad_partner(texts[stem], e, bad)
        unread = list(variants.get(stem, ()))
        if text is None and unread:  # utt.normalized.txt, the first in name order; an empty utt.txt does not hide it
            used = unread.pop(0)
            try:
                text = _partner_file(root, used)
            except CleanError as e:
                yield from _bad_partner(used, e, bad)
        if unread:
            meta[UNREAD_FILES] = unread
        if stem in infos:
            try:
                info = json_object(_partner_file(root, infos[stem]) or b"", infos[stem])
                text, label, meta = with_json(info, text, label, infos[stem])
            except CleanError as e:
                yield from _bad_partner(infos[stem], e, bad)
        if split in SPLIT_NAMES:
            meta["split"] = split
        uri = f"{root}/{rel}"
        media = Media(uri=uri, name=rel, stamp=stamps.get(uri))
        yield RawSample(id=rel, text=text, label=label, meta=meta, source=rel, **{kind: media})


def _text_variants(kinds: list[tuple[str, str | None]], texts: dict[str, str]) -> dict[str, list[str]]:
    """Media path without extension -> the ``.txt`` files named after it with one more dot part, in name
    order: LibriTTS's ``utt.normalized.txt`` and ``utt.original.txt`` beside ``utt.wav``, or a caption per
    language (``p.en.txt``). Without a plain ``utt.txt`` that gives a text, the first is the text, as a tar's
    dotted member stands in for its text (``pipelines.readers.wds``); the others go in the sample's meta."""
    media = {posixpath.splitext(rel)[0] for rel, kind in kinds if kind}
    found: dict[str, list[str]] = {}
    for rel, kind in kinds:
        if kind is None and extension(rel) == TEXT_EXTENSION:
            stem = posixpath.splitext(rel)[0]
            base, dot, _ = stem.rpartition(".")
            if dot and "/" not in stem[len(base):] and base in media and stem not in texts:
                found.setdefault(base, []).append(rel)
    return {base: sorted(names) for base, names in found.items()}


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


def _shards(root: str, parents: set[str], files: list[str], with_json: bool) -> bool:
    """Whether the folders of the media files are img2dataset's shards (``00000/``, ``00001/``), not
    classes: all named by digits of one width of five or more, as img2dataset names them, and with the
    files it writes: a ``.json`` beside its images (``with_json``: any, so that a shard missing some stays
    a shard) or a ``NNNNN_stats.json`` beside a shard folder. MNIST's ``0/`` .. ``9/`` are classes, and so
    are ``cats/`` and ``dogs/`` whatever files lie beside the images, and GTSRB's ``00000/`` .. ``00042/``,
    which hold images and a ``GT-00000.csv``."""
    if len({len(name) for name in parents}) != 1 or not all(SHARD_FOLDER.fullmatch(name) for name in parents):
        return False
    stats = {f"{name}_stats.json" for name in parents}
    if not with_json and not any(posixpath.basename(rel) in stats for rel in files):
        return False
    shown_names = ", ".join(sorted(parents)[:3]) + (", ..." if len(parents) > 3 else "")
    logger.info(
        "folder %r: its folders (%s) are numbered as img2dataset numbers its shards, so they are read as "
        "shards, not classes, and give no label; to label by folder, name the folders by class",
        root, shown_names,
    )
    return True


def _partner_file(root: str, rel: str) -> bytes | None:
    """The bytes of a ``.txt`` or ``.json`` beside a media file, None when empty (as an empty member of a
    tar); ``CleanError`` saying which file when it cannot be read. A text's bytes are decoded strictly by
    the text cleaner, as a tar's ``.txt`` is."""
    try:
        return read_media(Media(uri=f"{root}/{rel}", name=rel))
    except CleanError as e:
        if e.reason == "file.empty":
            return None
        raise CleanError(e.reason, f"{rel} cannot be read ({e.detail})") from e


def _bad_partner(rel: str, error: CleanError, bad: set[str]) -> Iterator[Reject]:
    """The reject of a ``.txt`` or ``.json`` that cannot be used, once (an image and an audio file may
    share it): its media files are read without it, so that a damaged sidecar does not cost the samples."""
    if rel in bad:
        return
    bad.add(rel)
    stem = posixpath.basename(posixpath.splitext(rel)[0])
    without = "this text" if extension(rel) == TEXT_EXTENSION else "it"
    detail = (
        f"{error.detail}; the image or audio files named '{stem}.*' beside it are read without {without}: "
        "fix the file, or remove it"
    )
    yield reject(error.reason, detail, rel, rel)


def _unsupported(rel: str, partner: str | None = None) -> Reject:
    ext = extension(rel)
    stem = posixpath.basename(posixpath.splitext(rel)[0])
    if ext in PARTNERS and partner is not None:
        what = f"{partner} already holds the {PARTNERS[ext]} of the image or audio files named '{stem}.*'"
    elif ext == TEXT_EXTENSION and stem.endswith(TRANSCRIPTS):
        what = (
            "a LibriSpeech transcript: mbm takes a file's text from a .txt of the same name beside it, not from "
            "one file of '<id> <text>' lines; write a manifest from these lines (README: LibriSpeech)"
        )
    elif ext in PARTNERS:
        what = f"no image or audio file named '{stem}.*' beside it, whose {PARTNERS[ext]} it would be"
    elif ext in UNREAD_EXTENSIONS:
        what = f"it is {_unread_format(ext)}"
    elif ext:
        what = f"'.{ext}' is not an image or audio extension mbm reads"
    else:
        what = "it has no extension"
    return reject("read.unsupported_file", f"{rel}: not read as a sample ({what})", rel, rel)
