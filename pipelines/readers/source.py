"""``ReadSource``: a manifest, an imagefolder/audiofolder or WebDataset tars as ``RawSample``s and ``Reject``s.

inputs ─► Read (one file per element) ─► GroupById ─► FirstWins [─► GroupByMedia] ─┬► Route ─► samples
             └─► rejects ───────────────────────────────────────────────────────────┘      └─► rejects

The de-duplication's shuffle already spreads the samples over the workers (by id), so no reshuffle
follows it: on Beam's local runner that was one more copy of every sample held in the driver. With
``dedupe``, ``GroupByMedia`` (``pipelines.dedupe``) shuffles them once more, by the media they point at.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import pickle
import posixpath
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipelines.dedupe import media_key
from pipelines.readers.common import (
    absolute,
    display_name,
    duplicate,
    has_scheme,
    local_path,
    media_kind,
    remote_folder_exists,
    strip_slashes,
)
from pipelines.readers.folder import check_metadata, iter_folder, list_files, tables_hint
from pipelines.readers.manifest import check_columns, iter_manifest, listed_columns
from pipelines.readers.rows import FORMATS, format_of
from pipelines.readers.wds import TAR_NAMES, iter_tar
from pipelines.spill import BundleFile, pread_exact
from schemas import Media, RawSample, Reject
from schemas.manifest import SPLIT_NAMES

logger = logging.getLogger(__name__)

SAMPLES, REJECTS = "samples", "rejects"
BY_MEDIA = "by_media"  # _FirstWinsFn's output of (media key, where a sample lies), with dedupe
_GLOB = re.compile(r"[*?\[]")
NOT_EXPANDED = "manifest names one file and patterns are not expanded"


@dataclass(kw_only=True)
class SourceConfig:
    """Where a job's raw samples come from: exactly one of ``manifest``, ``folder``, ``shards``."""

    manifest: str | None = None  # .jsonl / .json / .csv / .tsv / .parquet (optionally .gz etc.)
    folder: str | None = None  # HF imagefolder / audiofolder root
    shards: str | None = None  # WebDataset tars: a glob or brace pattern, one tar, or a folder of *.tar
    format: str | None = None  # jsonl | json | csv | tsv | parquet (manifest only; default by extension)
    allow_outside: bool = False  # allow media outside the manifest folder (../x, absolute paths, URIs)

    def __post_init__(self) -> None:
        given = [k for k in ("manifest", "folder", "shards") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("[input] needs exactly one of manifest, folder, shards")
        if self.format is not None:
            if not self.manifest:
                raise ValueError("[input] format applies to a manifest only")
            if self.format.lower() not in FORMATS:
                raise ValueError(f"[input] format {self.format!r} is not one of {', '.join(sorted(FORMATS))}")
        if self.manifest:
            _check_one_file(self.manifest)
            fmt = format_of(self.manifest, self.format)
            if fmt is None:
                raise ValueError(
                    f"[input] cannot tell the format of manifest {self.manifest!r} from its extension"
                    f"{_not_a_table(self.manifest)}"
                )
            _check_local(self.manifest, "manifest", os.path.isfile, "file")
            if local_path(self.manifest) is not None:
                check_columns(self.manifest, fmt)  # a file no row of which can be a sample: say so now
        if self.folder:
            _check_local(self.folder, "folder", os.path.isdir, "folder")
            if local_path(self.folder) is not None:
                check_metadata(self.folder)  # a metadata file no row of which can name a file: say so now
        if self.shards and not _literal(self.shards) and not _GLOB.search(self.shards) and "{" not in self.shards:
            _check_local(self.shards, "shards", os.path.exists, "tar or folder")
        if self.shards and local_path(self.shards) is not None:
            expand_shards(self.shards)  # a folder without *.tar, a pattern matching nothing: say so now

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceConfig:
        return cls(**d)


def _check_local(path: str, key: str, test: Any, what: str) -> None:
    local = local_path(path)
    if local is not None and not test(local):
        state = "is not a " + what if os.path.exists(local) else "does not exist"
        raise ValueError(f"[input] {key} {path!r} {state}")


def _check_one_file(manifest: str) -> None:
    """A manifest is one file: a glob or brace pattern (a Hugging Face Hub split in several Parquet
    files) is not expanded, and is refused with what to do instead; one that matches nothing is a file
    that does not exist."""
    from braceexpand import UnbalancedBracesError, braceexpand

    local = local_path(manifest)
    if local is not None and os.path.isdir(local):
        raise ValueError(f"[input] manifest {manifest!r} is a folder; name the manifest file in it, or read the "
                         "folder with folder = (an imagefolder or audiofolder) or shards = (WebDataset tars)")
    if local is None or os.path.isfile(local) or not (_GLOB.search(local) or "{" in local):
        return
    try:
        matches = sorted({m for part in braceexpand(local) for m in glob.glob(part)})
    except UnbalancedBracesError:
        matches = []
    if not matches:
        raise ValueError(f"[input] manifest {manifest!r} does not exist ({NOT_EXPANDED})")
    if len(matches) == 1:
        raise ValueError(f"[input] manifest {manifest!r} does not exist; as a pattern it would match "
                         f"{matches[0]!r}, but {NOT_EXPANDED}: name that file")
    raise ValueError(
        f"[input] manifest {manifest!r} is a pattern (it matches {len(matches)} files): {NOT_EXPANDED} (only "
        "shards = takes patterns, of WebDataset tars). Join the files into one manifest and name that: JSON "
        "Lines with cat, CSV/TSV with cat keeping the first header line only, Parquet with "
        "pyarrow.parquet.write_table(pyarrow.parquet.read_table("
        + ("sorted(f for p in braceexpand.braceexpand(PATTERN) for f in glob.glob(p))" if "{" in local
           else "sorted(glob.glob(PATTERN))") + "), 'train.parquet')"
    )


@dataclass(frozen=True)
class Input:
    """One unit of reading: a manifest, a folder or one tar; ``index`` orders inputs for first-wins."""

    index: int
    kind: str  # "manifest" | "folder" | "tar"
    path: str
    name: str  # short name used in sources and reject ids
    split: str | None = None  # a tar's split, from its path (``tar_split``): its samples' unless they name one


def tar_split(path: str, root: str) -> str | None:
    """The split a tar's path names (``mbm train --split-by split``), as Hugging Face lays out WebDataset
    datasets: a folder under ``root`` (the folder all of the input's tars share: data/train/0000.tar), else a
    word of the file's name (cc3m-validation-0001.tar); the first of those that is a split name, lower-case.
    Folders above ``root`` do not count (a home folder named dev)."""
    rel = posixpath.relpath(path, root) if root else posixpath.basename(path)
    *folders, name = rel.split("/")
    stem = name
    for ext in sorted(TAR_NAMES, key=len, reverse=True):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    for word in (*folders, *re.split(r"[^0-9A-Za-z]+", stem)):
        if word.lower() in SPLIT_NAMES:
            return word.lower()
    return None


def list_inputs(config: SourceConfig) -> list[Input]:
    """The inputs of ``config`` in order: shard patterns brace-expanded, globs matched and sorted."""
    from apache_beam.io.filesystems import FileSystems

    if config.manifest:
        kind, paths = "manifest", [absolute(config.manifest)]
    elif config.folder:
        folder = absolute(config.folder)
        kind, paths = "folder", [strip_slashes(folder) if has_scheme(folder) else folder]
    else:
        kind, paths = "tar", expand_shards(config.shards or "")
    if has_scheme(paths[0]) and kind != "tar" and not (
            FileSystems.exists(paths[0]) if kind == "manifest" else remote_folder_exists(paths[0])):
        raise ValueError(f"[input] {kind} {paths[0]!r} does not exist")
    names = [display_name(p) for p in paths]
    if len(set(names)) < len(names):  # same base name in two folders: full paths keep sources apart
        names = paths
    if kind != "tar":
        return [Input(i, kind, p, n) for i, (p, n) in enumerate(zip(paths, names, strict=True))]
    root = posixpath.dirname(paths[0]) if len(paths) == 1 else posixpath.commonpath(paths)
    return [Input(i, kind, p, n, tar_split(p, root)) for i, (p, n) in enumerate(zip(paths, names, strict=True))]


def _literal(path: str) -> bool:
    """Whether a local ``shards`` value names an existing file or folder as it is written (``run [2024]``):
    then its brackets and braces are part of the name, not a pattern."""
    local = local_path(absolute(path))
    return local is not None and os.path.exists(local)


def expand_shards(pattern: str) -> list[str]:
    """Tar paths of a brace/glob pattern, in pattern order; a missing explicit path is kept (read rejects it)."""
    from apache_beam.io.filesystems import FileSystems
    from braceexpand import braceexpand

    parts = [absolute(p) for p in ([pattern] if _literal(pattern) else braceexpand(pattern))]
    # a folder: its tars, plain and compressed
    parts = [q for p in parts for q in (_tars_in(p) if _is_folder(p) else [p])]
    remote = [p for p in parts if _GLOB.search(p) and local_path(p) is None]
    matched = {p: sorted(m.path for m in r.metadata_list)
               for p, r in zip(remote, FileSystems.match(remote), strict=True)} if remote else {}
    for p in parts:
        if _GLOB.search(p) and p not in matched and not _literal(p):  # local: glob lists broken links too
            matched[p] = sorted(glob.glob(local_path(p)))
    paths: list[str] = []
    for part in parts:
        paths += matched[part] if part in matched else [part]
    paths = list(dict.fromkeys(paths))
    explicit = (p for p in parts if p not in matched)
    if not paths or not (any(matched.values()) or any(map(FileSystems.exists, explicit))):
        if _literal(pattern) and os.path.isdir(absolute(pattern)):
            raise ValueError(f"[input] shards {pattern!r} is a folder holding no tar (a file named "
                             f"{', '.join('*' + ext for ext in TAR_NAMES[:3])}, ...)"
                             f"{_not_tars(absolute(pattern), pattern)}")
        raise ValueError(f"[input] shards {pattern!r} matches no files")
    others = [p for p in paths if not p.lower().endswith(TAR_NAMES)]
    if len(others) == len(paths) and any(format_of(p) or media_kind(p) for p in others):
        # every file a read.not_a_tar reject, and a version of nothing
        names = [os.path.basename(p) for p in others]
        folder = os.path.dirname(others[0])
        if any(media_kind(p) for p in others):
            hint = f"; image or audio files are read with [input] folder = {folder!r}"
        else:
            hint = tables_hint(folder, names)
        raise ValueError(f"[input] shards {pattern!r} matches no WebDataset tar ({len(paths)} other "
                         f"file{'s' if len(paths) > 1 else ''}: {listed_columns(names, 4)}){hint}")
    return paths


def _not_a_table(path: str) -> str:
    """What to read a manifest path of no table format with: the [input] its kind of file needs, or the
    format setting."""
    name = path.lower()
    if name.endswith(TAR_NAMES):
        return f": a WebDataset tar is read with [input] shards = {path!r}"
    if name.endswith(".arrow"):
        return ("; an .arrow file is what Hugging Face datasets' save_to_disk writes: export the dataset, "
                "datasets.load_from_disk(folder).to_parquet(\"data.parquet\") (media as {bytes, path} structs), "
                "and read that with [input] manifest = \"data.parquet\"")
    if media_kind(name):
        return ("; a manifest is a table of samples: an image or audio file alone is not one (a folder of them is "
                "read with [input] folder)")
    return "; set format = jsonl | json | csv | tsv | parquet if it is one of those"


def _not_tars(root: str, pattern: str) -> str:
    """What to read a folder with that holds no tar: [input] folder for media files (an imagefolder, or
    img2dataset's files output), [input] manifest for a table; else a pattern of its tars."""
    files = list_files(root)
    if any(media_kind(rel) for rel in files):
        return (f"; it holds image or audio files (an imagefolder/audiofolder, or img2dataset's files output): "
                f"read it with [input] folder = {pattern!r}")
    return tables_hint(pattern, files) or "; name its tars with a pattern"


def _is_folder(path: str) -> bool:
    """Whether ``path`` names a folder: a local one, or a prefix of an object store's keys that is not itself
    an object and has objects below it (``gs://b/tars``: an object store has no folders)."""
    local = local_path(path)
    if local is not None:
        return os.path.isdir(local)
    if _GLOB.search(path) or path.lower().endswith(TAR_NAMES):  # no request per tar of a {0000..9999} pattern
        return False
    from apache_beam.io.filesystems import FileSystems

    return not FileSystems.exists(path) and remote_folder_exists(path)


def _tars_in(folder: str) -> list[str]:
    """The patterns of a folder's tars: ``*.tar``, and one for each compressed tar name its files have
    (``*.tar.gz``, ``*.tgz``, ...). A local folder's own name is escaped ("run [2024]")."""
    local = local_path(folder)
    if local is not None:
        names = os.listdir(local)
    else:
        from apache_beam.io.filesystems import FileSystems

        (listed,) = FileSystems.match([strip_slashes(folder) + "/*"])
        names = [posixpath.basename(m.path) for m in listed.metadata_list]
    kinds = [ext for ext in TAR_NAMES if ext == ".tar" or any(name.endswith(ext) for name in names)]
    base = glob.escape(folder) if local is not None else strip_slashes(folder)
    return [posixpath.join(base, "*" + ext) for ext in kinds]


def read_input(item: Input, config: SourceConfig) -> Iterator[RawSample | Reject]:
    """Samples and rejects of one input, in source order."""
    if item.kind == "manifest":
        return iter_manifest(item.path, config, name=item.name)
    if item.kind == "folder":
        return iter_folder(item.path, config)
    return iter_tar(item.path, config, name=item.name, split=item.split)


class _ReadFn(beam.DoFn):
    """One input → ``(id, ((input index, position), sample))`` on the main output, rejects tagged.

    Without a spool the sample goes pickled: Beam's local runner decodes what it groups into Python
    objects and holds them all in the driver, where a caption's pickled bytes take ~650 bytes against
    ~900 as a ``RawSample``.

    With ``spool`` (a local folder), the pickled sample itself is appended to one file there per bundle
    and only ``(path as bytes, offset, size)`` goes through the de-duplication's shuffle, which ``_FirstWinsFn``
    reads back; media bytes a reader holds (a compressed or remote tar's members, bytes cells of a
    Parquet or JSON manifest) go to that file first and the sample continues with a reference (``Media``
    with an offset and a size) that the cleaner reads. So the shuffle, which the local runner holds in
    the driver and sends on to the workers, carries ~100 bytes a sample, whatever the sample holds.
    """

    def __init__(self, config: SourceConfig, spool: str | None = None, dedupe: bool = False) -> None:
        self._config = config
        self._spool = spool
        self._dedupe = dedupe
        self._samples = Metrics.counter("read", "samples")

    def start_bundle(self) -> None:
        self._file = BundleFile(self._spool, "spooling the samples read") if self._spool else None
        # with dedupe, the same bytes (a picture a tar holds under each caption) are spooled once, so that
        # their samples point at one place and group together (pipelines.dedupe.media_key)
        self._spooled_at: dict[bytes, tuple[str, int]] = {}

    def process(self, item: Input) -> Iterator[Any]:
        for position, out in enumerate(read_input(item, self._config)):
            if isinstance(out, Reject):
                Metrics.counter("read", out.reason).inc()
                yield beam.pvalue.TaggedOutput(REJECTS, out)
            else:
                self._samples.inc()
                if self._file is None:
                    where: Any = pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)
                else:
                    out = self._spooled(out)
                    data = pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)
                    path, offset = self._file.append(data)  # the path as bytes: Beam's coder takes no surrogates
                    where = (os.fsencode(path), offset, len(data))
                if self._dedupe:  # what groups it with its copies, once its id is known to be unique
                    yield out.id, ((item.index, position), where, media_key(out))
                else:
                    yield out.id, ((item.index, position), where)

    def finish_bundle(self) -> None:
        if self._file is not None:
            self._file.close()

    def _spooled(self, sample: RawSample) -> RawSample:
        moved = {}
        for m in ("image", "audio"):
            media = getattr(sample, m)
            if media is not None and media.data:
                digest = hashlib.blake2b(media.data, digest_size=16).digest() if self._dedupe else b""
                path, offset = self._spooled_at.get(digest) or self._file.append(media.data)
                if digest:
                    self._spooled_at[digest] = (path, offset)
                moved[m] = Media(uri=path, offset=offset, size=len(media.data), name=media.name)
        return replace(sample, **moved) if moved else sample


class _SpoolReader(beam.DoFn):
    """Reads samples that come pickled, or as where ``_ReadFn`` spooled them (one open file per spool file)."""

    def __init__(self) -> None:
        self._files: dict[bytes, int] = {}

    def _sample(self, value: bytes | tuple[bytes, int, int]) -> RawSample:
        if isinstance(value, bytes):
            return pickle.loads(value)
        path, offset, size = value
        if path not in self._files:
            self._files[path] = os.open(path, os.O_RDONLY)
        return pickle.loads(pread_exact(self._files[path], size, offset, os.fsdecode(path), "spool file"))

    def finish_bundle(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def teardown(self) -> None:
        self.finish_bundle()


class _FirstWinsFn(_SpoolReader):
    """The first sample of an id (by input order, then position) passes; the others become rejects.
    With ``dedupe``, a first sample with media passes unread, as ``(media key, where it lies)`` on the
    ``by_media`` output, for ``GroupByMedia``: the shuffle then carries ~100 bytes a sample, as here."""

    def __init__(self, dedupe: bool = False) -> None:
        super().__init__()
        self._dedupe = dedupe
        self._duplicates = Metrics.counter("read", "read.duplicate_id")

    def process(self, element: tuple[str, Any]) -> Iterator[Any]:
        sample_id, values = element
        ranked = sorted(values, key=lambda v: v[0])
        key = ranked[0][2] if self._dedupe else None
        kept = self._sample(ranked[0][1]) if key is None or len(ranked) > 1 else None
        yield kept if key is None else beam.pvalue.TaggedOutput(BY_MEDIA, (key, ranked[0][1]))
        for other in ranked[1:]:
            self._duplicates.inc()
            yield duplicate(sample_id, self._sample(other[1]).source, kept.source)


class _LoadFn(_SpoolReader):
    """Samples grouped by their media, read from where they lie."""

    def process(self, value: bytes | tuple[bytes, int, int]) -> Iterator[RawSample]:
        yield self._sample(value)


def _route(item: RawSample | Reject) -> Iterator[Any]:
    yield beam.pvalue.TaggedOutput(REJECTS if isinstance(item, Reject) else SAMPLES, item)


class ReadSource(beam.PTransform):
    """Reads ``config``'s source; outputs ``samples`` (``RawSample``, unique ids) and ``rejects`` (``Reject``)."""

    def __init__(self, config: SourceConfig, spool: str | None = None, dedupe: bool = False) -> None:
        """``spool``: a local folder for the media bytes readers hold (``_ReadFn``); None keeps them in
        the samples (a remote runner's shuffle is not held in one process's memory). ``dedupe``: the
        samples come grouped by the media they point at (``pipelines.dedupe.GroupByMedia``)."""
        super().__init__()
        self._config = config
        self._spool = spool
        self._dedupe = dedupe

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.pvalue.DoOutputsTuple:
        inputs = list_inputs(self._config)
        logger.info("reading %d %s input(s), first %s", len(inputs), inputs[0].kind, inputs[0].path)
        read = (
            pbegin
            | "Inputs" >> beam.Create(inputs)
            | "Read" >> beam.ParDo(_ReadFn(self._config, self._spool, self._dedupe)).with_outputs(REJECTS, main="keyed")
        )
        first = (read.keyed | "GroupById" >> beam.GroupByKey()
                 | "FirstWins" >> beam.ParDo(_FirstWinsFn(self._dedupe)).with_outputs(BY_MEDIA, main="unique"))
        parts = [first.unique, read[REJECTS]]
        if self._dedupe:
            from pipelines.dedupe import GroupByMedia

            parts.append(first[BY_MEDIA] | "GroupByMedia" >> GroupByMedia() | "Load" >> beam.ParDo(_LoadFn()))
        return (
            parts
            | "Merge" >> beam.Flatten()
            | "Route" >> beam.ParDo(_route).with_outputs(SAMPLES, REJECTS)
        )
