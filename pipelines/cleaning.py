"""The cleaning stage: one RawSample in, a CleanSample or a Reject out.

Each present modality goes through its cleaner; a modality that fails is dropped with its reason,
and a sample that keeps none is rejected. Content hashes are taken here, from the raw bytes and the
cleaning settings, so the incremental planner can tell what changed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from mbm.extractors.handler import configure_threads
from pipelines.clean import REVISIONS
from pipelines.dedupe import LRUCache, cleaned_cache
from pipelines.errors import CleanError
from pipelines.media import LocalFile, large_local_file, media_identity, read_media
from schemas import MODALITIES, CleanSample, RawSample, Reject, sample_key
from schemas.manifest import split_name
from schemas.records import OTHER_KEY, escape_undecodable

log = logging.getLogger(__name__)

REJECTS = "rejects"
#: what to do about a file over its modality's ``max_bytes``, said in the ``file.too_large`` detail
TOO_LARGE_HINT = {
    "image": "raise it in the job spec, or make the image smaller",
    "audio": "audio held in memory (bytes in a manifest, a member of a compressed or remote tar) is read whole, "
             "though only max_seconds of it are kept; raise it in the job spec, or cut the file first "
             "(ffmpeg -i IN -t 60 OUT.flac)",
}
UNCHANGED = "unchanged"


@dataclass(frozen=True, kw_only=True)
class CleanConfig:
    """The three cleaners' settings and what incremental planning needs, as one picklable value."""

    text: Any  # pipelines.clean.text.TextCleanConfig
    image: Any  # pipelines.clean.image.ImageCleanConfig
    audio: Any  # pipelines.clean.audio.AudioCleanConfig
    fingerprints: dict[str, str] = field(default_factory=dict)  # modality -> current extractor fingerprint
    previous_index: str | None = None  # Parquet index of the version to update; None recomputes everything
    dedupe: bool = True  # keep recent cleaned media by content hash: a copy is not decoded again (pipelines.dedupe)

    def for_modality(self, modality: str) -> Any:
        return getattr(self, modality)

    @functools.cached_property
    def config_bytes(self) -> dict[str, bytes]:
        """Each modality's ``_config_bytes``, made once (dumped to JSON for every sample and modality, they took
        ~5 % of a re-run's worker time)."""
        return {m: _config_bytes(m, self.for_modality(m)) for m in MODALITIES}


def _digest(*parts: bytes | LocalFile) -> str:
    """SHA-256 of the parts, each after its length; a ``LocalFile``'s bytes are read a MiB at a time."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, LocalFile):
            h.update(p.size.to_bytes(8, "little"))
            _update_from_file(h, p)
            continue
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def _update_from_file(h: Any, local: LocalFile) -> None:
    read = 0
    try:
        with local.open() as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                read += len(chunk)
    except OSError as e:
        raise CleanError("file.unreadable", f"{local.name}: {type(e).__name__}: {e}") from None
    if read != local.size:
        raise CleanError("file.unreadable", f"{local.name}: {read} of its {local.size} bytes were there as it was "
                         "read; the file was changed while the job ran")


def _config_bytes(modality: str, cfg: Any) -> bytes:
    """A modality's cleaning settings, and its cleaner's revision where it is past 1 (``REVISIONS``)."""
    settings = cfg.to_dict()
    if REVISIONS.get(modality, 1) != 1:
        settings["revision"] = REVISIONS[modality]
    return json.dumps(settings, sort_keys=True, default=str).encode()


def _text_bytes(text: str | bytes) -> bytes:
    if isinstance(text, bytes):
        return text
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte (e.g. JSON "\ud83d")
        return text.encode("utf-8", "surrogatepass")


def load_raw(raw: RawSample, cfg: CleanConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """Raw bytes (or a CleanError) and content hash of every present modality.

    The hash covers the raw bytes and that modality's cleaning settings, so a changed caption, a
    replaced image or new audio settings each change exactly one modality's hash.
    """
    data, hashes, _ = plan_raw(raw, cfg)
    return data, hashes


class _Unread:
    """In ``plan_raw``'s data: media not read, their hash known from the previous version (``read_later``)."""


UNREAD = _Unread()


def plan_raw(raw: RawSample, cfg: CleanConfig, previous: dict[str, Any] | None = None
             ) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """``load_raw``'s data and hashes, and the ``media_keys`` of the media files read: their identity on disk
    (``media_identity``) and the modality's settings, hashed. A file whose key is the one the sample's row in
    the previous version recorded is not read: its hash is that row's, and its data ``UNREAD``."""
    data: dict[str, Any] = {}
    hashes: dict[str, str] = {}
    keys: dict[str, str] = {}
    settings = cfg.config_bytes
    old_keys = json.loads(previous.get("media_stats") or "{}") if previous is not None else {}
    old_hashes = json.loads(previous["modality_hashes"] or "{}") if old_keys else {}
    for m in raw.present():
        if m == "text":
            data[m] = raw.text
            hashes[m] = _digest(b"text", _text_bytes(raw.text), settings[m])
            continue
        media = getattr(raw, m)
        identity = media_identity(media)
        key = None if identity is None else _digest(identity.encode("utf-8", "surrogatepass"), settings[m])[:32]
        if key is not None and old_keys.get(m) == key and m in old_hashes:
            data[m], hashes[m], keys[m] = UNREAD, old_hashes[m], key
            continue
        try:
            data[m] = _read(media, m, cfg)
            hashes[m] = _digest(m.encode(), data[m], settings[m])
            if key is not None:
                keys[m] = key
        except CleanError as e:
            data[m] = _with_hint(e, m)
            hashes[m] = _digest(m.encode(), b"<unreadable>", e.reason.encode(), settings[m])
    return data, hashes, keys


def read_later(raw: RawSample, modality: str, cfg: CleanConfig) -> Any:
    """The bytes of media ``plan_raw`` left unread (or the CleanError that says why there are none), for a
    sample whose features of them cannot be reused."""
    try:
        return _read(getattr(raw, modality), modality, cfg)
    except CleanError as e:
        return _with_hint(e, modality)


def _read(media: Any, modality: str, cfg: CleanConfig) -> bytes | LocalFile:
    """The media's bytes; a local audio file (or uncompressed tar member) over ``[audio] max_bytes`` stays in
    its file (``LocalFile``): its cleaner decodes at most ``max_seconds`` of it, so an hour-long recording is
    not read into memory."""
    limit = cfg.for_modality(modality).max_bytes
    if modality == "audio" and (local := large_local_file(media, limit)) is not None:
        return local
    return read_media(media, limit)


def _with_hint(error: CleanError, modality: str) -> CleanError:
    """A media read error, with the setting to change where it is one of size."""
    if error.reason != "file.too_large":
        return error
    return CleanError(error.reason, f"{error.detail} ([{modality}] max_bytes: {TOO_LARGE_HINT[modality]})")


def content_hash(hashes: dict[str, str], label: Any, meta: dict[str, Any]) -> str:
    label_bytes = json.dumps(label, sort_keys=True, default=str).encode()
    meta_bytes = json.dumps(meta, sort_keys=True, default=str).encode()
    return _digest(*(f"{m}={hashes[m]}".encode() for m in sorted(hashes)), label_bytes, meta_bytes)


def clean_value(modality: str, data: Any, cfg: CleanConfig) -> Any:
    """Run one modality's cleaner on its raw value; raises CleanError on bad data."""
    from pipelines.clean.audio import clean_audio
    from pipelines.clean.image import clean_image
    from pipelines.clean.text import clean_text

    if isinstance(data, CleanError):
        raise data
    cleaner = {"text": clean_text, "image": clean_image, "audio": clean_audio}[modality]
    return cleaner(data, cfg.for_modality(modality))


# Media whose features another sample of the previous version may hold (a new caption of a known picture);
# a text is cheap to featurize again.
CONTENT_REUSE = ("image", "audio")


def reusable(previous: dict[str, Any] | None, hashes: dict[str, str], cfg: CleanConfig) -> dict[str, str]:
    """Modalities whose features in the previous version are still valid -> the shard holding them."""
    if previous is None:
        return {}
    old_hashes = json.loads(previous["modality_hashes"] or "{}")
    old_fps = json.loads(previous["fingerprint"] or "{}")
    landed = previous["modalities"].split(",") if previous["modalities"] else []
    return {
        m: previous["shard"]
        for m in hashes
        if m in landed and old_hashes.get(m) == hashes[m] and old_fps.get(m) == cfg.fingerprints.get(m)
    }


def retried(previous: dict[str, Any], hashes: dict[str, str], cfg: CleanConfig) -> list[str]:
    """Modalities of an unchanged sample that failed extraction in the previous version under another
    extractor than this run's (a fixed model, other settings): they are extracted again. A row without
    the failed extractor's fingerprint (written before failures recorded it) counts as another one."""
    stages = previous["stage"].split(", ") if previous["stage"] else []
    old_fps = json.loads(previous["fingerprint"] or "{}")
    return [m for m in hashes if f"extract.{m}" in stages and old_fps.get(m) != cfg.fingerprints.get(m)]


def _clean_or_error(modality: str, data: Any, cfg: CleanConfig, sample_id: str) -> Any:
    """The cleaned value, or the CleanError that says why there is none."""
    try:
        return clean_value(modality, data, cfg)
    except CleanError as e:
        return e
    except Exception as e:  # a cleaner bug or an exotic decoder failure must not kill the job
        log.debug("unexpected error cleaning %s of %s", modality, sample_id, exc_info=True)
        return CleanError(f"{modality}.error", f"{type(e).__name__}: {e}")


def clean_sample(raw: RawSample, cfg: CleanConfig, previous: dict[str, Any] | None = None,
                 cache: LRUCache | None = None, holding: Callable[[str, str], dict[str, Any] | None] | None = None
                 ) -> CleanSample | Reject | dict[str, Any]:
    """Plan and clean one sample against ``previous`` (its index row in the version being updated).

    Returns the previous index row itself (with the media keys this run found) when nothing about the
    sample changed, a Reject when no modality survives cleaning, else a CleanSample whose ``reused``
    modalities skip cleaning and extraction (their features are copied from the previous version's shard).
    ``cache`` holds the cleaned media (or their errors) of recent samples by content hash
    (``pipelines.dedupe``); ``holding(modality, content hash)`` gives a landed row of the previous version
    with those media (a picture under a new caption): their features are copied from that sample.
    """
    data, hashes, keys = plan_raw(raw, cfg, previous)
    content = content_hash(hashes, raw.label, raw.meta)
    reuse = reusable(previous, hashes, cfg)
    if (previous is not None and previous["content_hash"] == content
            and set(reuse) == set(previous["modalities"].split(",")) and not retried(previous, hashes, cfg)):
        return {**previous, "media_stats": json.dumps(keys, sort_keys=True) if keys else None}
    if holding is not None:  # media another sample of the previous version holds the features of
        for m in CONTENT_REUSE:
            if m in hashes and m not in reuse and (row := holding(m, hashes[m])) is not None:
                if m in reusable(row, {m: hashes[m]}, cfg):
                    reuse[m] = f"{row['shard']}{OTHER_KEY}{sample_key(row['id'])}"
    values: dict[str, Any] = {}
    failures: list[tuple[str, CleanError]] = []
    for modality in raw.present():
        if modality in reuse and modality != "text":  # text is cheap and its cleaned form goes in the json
            continue
        if data[modality] is UNREAD:  # unchanged media whose features cannot be reused (another extractor)
            data[modality] = read_later(raw, modality, cfg)
        # a copy of media cleaned just before is not decoded again; media that could not be read are not
        # copies (their hash is the reason's: two missing files share it, not their messages)
        if cache is not None and modality != "text" and not isinstance(data[modality], CleanError):
            value = cache.get(hashes[modality])
            if value is None:
                value = _clean_or_error(modality, data[modality], cfg, raw.id)
                cache.put(hashes[modality], value)
        else:
            value = _clean_or_error(modality, data[modality], cfg, raw.id)
        if isinstance(value, CleanError):
            failures.append((modality, value))
        else:
            values[modality] = value
    if not values and not reuse:
        if not failures:
            return Reject(id=raw.id, stage="read", reason="read.no_modality", detail="no text, image or audio",
                          source=raw.source)
        stage = f"clean.{failures[0][0]}" if len(failures) == 1 else "clean"
        return Reject(
            id=raw.id,
            stage=stage,
            reason="; ".join(e.reason for _, e in failures),
            detail="; ".join(f"{m}: {e.detail}" for m, e in failures),
            source=raw.source,
        )
    return CleanSample(
        id=raw.id,
        key=sample_key(raw.id),
        label=raw.label,
        meta=raw.meta,
        text=values.get("text"),
        image=values.get("image"),
        audio=values.get("audio"),
        sample_rate=cfg.audio.sample_rate if "audio" in values else None,
        dropped={m: escape_undecodable(f"clean.{m}: {e.reason}: {e.detail}") for m, e in failures},
        content_hash=content,
        modality_hashes=hashes,
        media_keys=keys,
        source=raw.source,
        reused=reuse,
        plan="changed" if previous is not None else "new",
    )


class PreviousIndex:
    """The landed rows of the previous version, by id. Every cleaning worker holds one, so the rows stay
    Arrow columns (their bytes, a few hundred per row) and a row becomes a dict only when a sample asks
    for it: as Python dicts they took ~2.8 KB a row, 558 MB for 200,000 rows in each worker."""

    def __init__(self, table: Any) -> None:
        """``table``: the index's landed rows (status ``ok``)."""
        self._names = table.column_names
        self._columns = [table.column(n) for n in self._names]  # a chunk per row group: few
        # the last row of an id wins, as a dict built from the rows would have it
        self._at = {sample_id: i for i, sample_id in enumerate(table.column("id").to_pylist())}
        self._content: tuple[Any, Any] | None = None  # sorted keys and their rows, built when first asked (holding)

    def _row(self, i: int) -> dict[str, Any]:
        return {name: column[i].as_py() for name, column in zip(self._names, self._columns, strict=True)}

    @staticmethod
    def _content_key(modality: str, digest: str) -> int:
        """62 bits of the content hash and the modality in 64 (a collision only costs a look at the row's hashes)."""
        return int(digest[:16], 16) & ~3 | MODALITIES.index(modality)

    def holding(self, modality: str, digest: str) -> dict[str, Any] | None:
        """A landed row whose ``modality`` features came from media with content hash ``digest``, or None.
        The lookup is built on the first call, from the rows' hashes: 12 bytes per landed image or clip."""
        if self._content is None:
            keys, rows = np.empty(0, np.uint64), np.empty(0, np.int32)
            hashes = self._columns[self._names.index("modality_hashes")]
            landed = self._columns[self._names.index("modalities")]
            for start in range(0, len(hashes), 65536):  # as Python strings a slice at a time
                part_keys, part_rows = [], []
                texts, mods = (c.slice(start, 65536).to_pylist() for c in (hashes, landed))
                for i, (text, row_mods) in enumerate(zip(texts, mods, strict=True), start):
                    if text and row_mods:
                        row_hashes = json.loads(text)
                        for m in CONTENT_REUSE:
                            if m in row_hashes and m in row_mods.split(","):
                                part_keys.append(self._content_key(m, row_hashes[m]))
                                part_rows.append(i)
                keys = np.concatenate([keys, np.array(part_keys, np.uint64)])
                rows = np.concatenate([rows, np.array(part_rows, np.int32)])
            order = np.argsort(keys, kind="stable")
            self._content = keys[order], rows[order]
        keys, rows = self._content
        key = np.uint64(self._content_key(modality, digest))
        at = int(np.searchsorted(keys, key))
        return self._row(int(rows[at])) if at < len(keys) and keys[at] == key else None

    def get(self, sample_id: str) -> dict[str, Any] | None:
        i = self._at.get(sample_id)
        return None if i is None else self._row(i)

    def __len__(self) -> int:
        return len(self._at)


def load_previous(index_path: str | None) -> PreviousIndex | dict[str, dict[str, Any]]:
    """Landed samples of the previous version by id (empty when there is none): ``.get(id)`` is its index
    row as a dict, or None. Its ``media_stats`` are those of the version's keys file where a later run that
    changed nothing wrote one (``pipelines.commit.keys_path``)."""
    if not index_path:
        return {}
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    from pipelines.commit import recorded_keys

    # the landed rows, a row group at a time (read_table's filters import pyarrow.dataset: 0.23 s in every worker)
    with FileSystems.open(index_path, compression_type="uncompressed") as f:
        pf = pq.ParquetFile(f)
        groups = [g.filter(pc.equal(g.column("status"), "ok"))
                  for g in (pf.read_row_group(i) for i in range(pf.num_row_groups))]
        landed = pa.concat_tables(groups) if groups else pf.schema_arrow.empty_table()
    del groups
    keys = recorded_keys(index_path, landed)  # those a later run that made no version found
    if keys is not None:
        field = pa.field("media_stats", pa.string())
        at = landed.schema.get_field_index("media_stats")
        landed = landed.set_column(at, field, keys) if at >= 0 else landed.append_column(field, keys)
    previous = PreviousIndex(landed)
    del landed
    pa.default_memory_pool().release_unused()  # what reading the file took beside the table (~2x it)
    return previous


class CleanSampleFn(beam.DoFn):
    """Beam stage around ``clean_sample``: main output CleanSample, tagged ``rejects`` and ``unchanged``."""

    def __init__(self, cfg: CleanConfig) -> None:
        self._cfg = cfg
        self._previous: PreviousIndex | dict[str, dict[str, Any]] = {}
        self._ok = Metrics.counter("mbm", "cleaned")
        self._rejected = Metrics.counter("mbm", "rejected_clean")
        self._unchanged = Metrics.counter("mbm", "unchanged")

    def setup(self) -> None:
        self._previous = load_previous(self._cfg.previous_index)
        self._cache = cleaned_cache() if self._cfg.dedupe else None

    def start_bundle(self) -> None:
        # Decoded images and waveforms are large blocks too (the allocator settings). Resampling runs
        # torch, and cleaning comes before the first model load: size torch's thread pool here, or each
        # worker's first cleaning runs with a thread per core (on 2 cores: 4 threads, each worker's
        # idle OpenMP thread spinning 0.4 CPU-s at the job's start). Per bundle, in the bundle's
        # thread: OpenMP's thread count is a per-thread setting. A worker without torch yet (no fork
        # server) is not made to import it: a re-run that changed nothing never needs it.
        configure_threads(load_torch=False)

    def process(self, raw: RawSample):
        holding = getattr(self._previous, "holding", None) if self._cfg.dedupe else None
        out = clean_sample(raw, self._cfg, self._previous.get(raw.id), self._cache, holding)
        if isinstance(out, Reject):
            self._rejected.inc()
            yield beam.pvalue.TaggedOutput(REJECTS, out)
        elif isinstance(out, dict):
            self._unchanged.inc()
            # The index holds labels as text; the vocabulary needs the label as read (1 and "1" differ).
            # The source is where the sample is now (rows move, manifests change format).
            yield beam.pvalue.TaggedOutput(UNCHANGED, {**out, "label_value": raw.label, "source": raw.source,
                                                         "split_value": split_name(raw.meta)})
        else:
            self._ok.inc()
            yield out
