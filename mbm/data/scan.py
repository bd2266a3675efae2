"""Shard scans kept, in this process and on disk, so that a shard's headers and json docs are read once.

Every data-loader worker of every rank reads every shard's tar headers and json docs to agree on the
sample order (``mbm.data.stream``): 75-80 µs a sample on a 2-core machine, the same work in every worker,
every rank and every epoch, which capped the loader's throughput on large datasets (docs/benchmarks.md,
"Where the loader's time goes"). What a scan finds is small: per sample its key, id, label, text,
modalities, the offset and size of each array in the shard, its content hashes and the split its metadata
names, and the skips met on the way, in order; as compressed json, 40-60 bytes a sample on shards
``mbm preprocess`` wrote. It is kept for every split alike (the split is chosen as it is replayed), and

- in this process, for up to ``MBM_SCAN_CACHE`` samples (default 100000; 0: none);
- on disk, one file per shard in ``MBM_SCAN_DIR`` (default ``$XDG_CACHE_HOME/mbm/scan``, else
  ``~/.cache/mbm/scan``; ``off``: none), which every worker, rank and later run (and ``mbm evaluate``)
  reads instead of scanning the shard again. Files are written whole and renamed into place, so
  processes scanning the same shard at once each leave a complete one; the folder can be deleted at any
  time.

A loader with two or more workers first has the shards without a kept scan scanned in parallel
(``index_shards``), so that its workers replay every shard from their first epoch on.

Either is replayed only while the shard is the same file (size, mtime, inode), and gives exactly the
samples and skips a fresh scan gives, in order: 13-15 µs a sample for the stream's whole part before
decoding, against 75-80 µs scanning (``benchmarks/stream.py --scan``). A shard written less than 2 s
before its scan began could be written again without its mtime changing (a timestamp tick is a few ms
here, 2 s on some file systems), so its scan is not written to disk; a later epoch's is. Shards whose
arrays are read eagerly (compressed tars) and shards that fail to open are scanned anew each time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
import time
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

from mbm.data.decode import Undecoded, content_hashes, parse_doc, undecoded
from mbm.data.errors import CorruptSample, SkipLog, in_shard
from mbm.data.shards import COMPRESSED, MemberRef, ShardFile, read_shards
from mbm.data.split import meta_split, split_doc

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 100_000
FORMAT = 1  # of the files in MBM_SCAN_DIR; another number is read as no file
OFF = "off"
# records: a sample, a skip whatever the split, a sample whose doc is unusable (a skip in its split only)
_SAMPLE, _SKIP, _BAD = 0, 1, 2
_ENV = object()
# a shard's scan is written to disk only when the shard was last written this long before the scan began
_SETTLED = 2_000_000_000


def _limit() -> int:
    try:
        return max(0, int(os.environ.get("MBM_SCAN_CACHE", DEFAULT_LIMIT)))
    except ValueError:
        return DEFAULT_LIMIT


def default_folder() -> str:
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mbm", "scan")


def env_folder() -> str | None:
    """``MBM_SCAN_DIR``: the folder of the scans kept on disk, None for ``off``."""
    value = os.environ.get("MBM_SCAN_DIR", "").strip()
    if value.lower() == OFF:
        return None
    return value or default_folder()


def _identity(stat: os.stat_result) -> list[int]:
    """(size, mtime, inode): a shard rewritten or replaced has another (the device is left out: a network
    file system's differs between the machines that share the folder)."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


class _Recorder:
    """Passes skips on to ``skips`` and, while ``records`` is a list, records them there in order."""

    def __init__(self, skips: SkipLog, records: list[Any] | None) -> None:
        self.skips, self.records = skips, records

    def skip(self, reason: str, detail: str = "") -> None:
        if self.records is not None:
            self.records.append([_SKIP, reason, detail])
        self.skips.skip(reason, detail)


class ScanCache:
    """This process's scans by shard path (compressed records), backed by the files in ``folder``."""

    def __init__(self, limit: int | None = None, folder: Any = _ENV) -> None:
        self.limit = _limit() if limit is None else limit
        self.folder: str | None = env_folder() if folder is _ENV else folder
        self.size = 0  # samples held
        self.entries: dict[str, tuple[list[int], bytes, int]] = {}  # path -> (identity, records, samples)
        self._warned = False

    def samples(self, paths: list[str], skips: SkipLog, keep_doc: Callable[[dict], bool],
                modalities: Collection[str]) -> Iterator[Undecoded]:
        """``parsed(read_shards(paths, skips, lazy=True), skips, keep_doc, modalities)``, from a kept scan where
        there is one. ``keep_doc`` (a split) reads only what ``split_doc`` keeps of a doc."""
        for path in paths:
            yield from self._shard(path, skips, keep_doc, modalities)

    def _shard(self, path: str, skips: SkipLog, keep_doc: Callable[[dict], bool],
               modalities: Collection[str]) -> Iterator[Undecoded]:
        try:
            stat = os.stat(path)
        except OSError:
            stat = None
        records = self._kept(path, _identity(stat)) if stat is not None else None
        if records is not None:
            yield from _replay(records, path, ShardFile(path, stat), skips, keep_doc, modalities)
        else:
            yield from self._scan(path, stat, skips, keep_doc, modalities)

    def _scan(self, path: str, stat: os.stat_result | None, skips: SkipLog, keep_doc: Callable[[dict], bool],
              modalities: Collection[str]) -> Iterator[Undecoded]:
        """A fresh scan of the shard, recorded as it goes; kept once the whole shard is read."""
        sink = _Recorder(skips, [] if stat is not None else None)
        started = time.time_ns()
        count = 0
        for raw in read_shards([path], sink, lazy=True):
            url = raw.get("__url__")
            try:
                doc = parse_doc(raw)
            except CorruptSample as exn:
                sink.skip(exn.reason, in_shard(url, exn.detail))
                continue
            view = split_doc(doc["id"], {}, meta_split(doc))
            try:
                sample = undecoded(raw, doc)
            except CorruptSample as exn:
                detail = in_shard(url, exn.detail)
                view["modality_hashes"] = hashes = content_hashes(doc)
                if sink.records is not None:
                    sink.records.append([_BAD, exn.reason, detail, doc["id"], hashes, view["meta"]["split"]])
                if keep_doc(view):
                    skips.skip(exn.reason, detail)
                continue
            view["modality_hashes"] = sample.content
            if sink.records is not None:
                refs = [_ref(v) for v in sample.npy.values()]
                if any(r is False for r in refs):  # arrays read eagerly (a compressed tar): too big to keep
                    sink.records = None
                else:
                    sink.records.append([_SAMPLE, sample.key, sample.id, sample.label, sample.text,
                                         list(sample.modalities), refs, sample.content, view["meta"]["split"]])
                    count += 1
            if keep_doc(view):
                sample.npy = {m: v for m, v in sample.npy.items() if m in modalities}
                yield sample
        # Reached only when the whole shard was read (a consumer that stops early closes the generator above).
        if sink.records is not None and _unchanged(path, stat):
            # A file written less than a timestamp tick before the scan could be written again with the same
            # size and mtime: such a scan stays in this process (as a racily clean file in git's index).
            self._keep(path, _identity(stat), sink.records, count, to_disk=stat.st_mtime_ns <= started - _SETTLED)

    def _kept(self, path: str, identity: list[int]) -> list[Any] | None:
        """The shard's records, from memory or from its file, where they are of this very file."""
        hit = self.entries.get(path)
        if hit is not None:
            if hit[0] == identity:
                return _records(hit[1])
            self.size -= self.entries.pop(path)[2]  # the shard changed: forget the old scan
        loaded = self._load(path, identity)
        if loaded is None:
            return None
        blob, count = loaded
        try:
            records = _records(blob)
        except (zlib.error, ValueError):
            return None
        self._remember(path, identity, blob, count)
        return records

    def _keep(self, path: str, identity: list[int], records: list[Any], count: int, *, to_disk: bool) -> None:
        blob = zlib.compress(json.dumps(records, separators=(",", ":")).encode("ascii"), 1)
        self._remember(path, identity, blob, count)
        if self.folder is not None and to_disk:
            self._save(path, identity, blob, count)

    def _remember(self, path: str, identity: list[int], blob: bytes, count: int) -> None:
        if self.limit > 0 and self.size + count <= self.limit:
            self.entries[path] = (identity, blob, count)
            self.size += count

    def file(self, path: str) -> str:
        """Where the scan of the shard at ``path`` is kept on disk (``folder`` must be set)."""
        name = hashlib.sha1(os.path.abspath(path).encode("utf-8", "surrogateescape")).hexdigest()
        return os.path.join(self.folder, name + ".scan")

    def _load(self, path: str, identity: list[int], *, header_only: bool = False) -> tuple[bytes, int] | None:
        """(records, samples) of the shard's file where it is a scan of this very shard; with ``header_only``,
        the records are not read (b"")."""
        if self.folder is None:
            return None
        try:
            with open(self.file(path), "rb") as f:
                head, _, blob = (f.readline(), b"", b"") if header_only else f.read().partition(b"\n")
            header = json.loads(head)
        except (OSError, ValueError):
            return None
        if (not isinstance(header, dict) or header.get("format") != FORMAT or header.get("path") != path
                or header.get("identity") != identity or not isinstance(count := header.get("samples"), int)):
            return None
        return blob, count

    def wants_scan(self, path: str) -> os.stat_result | None:
        """The shard's stat where a scan of it would be written to disk and none is there yet: a plain tar,
        last written over ``_SETTLED`` ago, and a folder to write to."""
        if self.folder is None:
            return None
        try:
            stat = os.stat(path)
            with open(path, "rb") as f:
                magic = f.read(6)
        except OSError:
            return None
        if (magic.startswith(COMPRESSED) or stat.st_mtime_ns > time.time_ns() - _SETTLED
                or self._load(path, _identity(stat), header_only=True) is not None):
            return None
        return stat

    def _save(self, path: str, identity: list[int], blob: bytes, count: int) -> None:
        header = json.dumps({"format": FORMAT, "path": path, "identity": identity, "samples": count})
        tmp = None
        try:
            os.makedirs(self.folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(header.encode("ascii") + b"\n" + blob)
            os.replace(tmp, self.file(path))
            tmp = None
        except OSError as exn:
            if not self._warned:
                self._warned = True
                log.warning("cannot keep shard scans in %s (%s): every loader process scans each shard again, every "
                            "epoch past MBM_SCAN_CACHE samples; set MBM_SCAN_DIR to a writable folder (or to off)",
                            self.folder, exn)
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def _ref(value: Any) -> list[int] | None | bool:
    """A member as a record holds it: [offset, size], None where absent, False where its bytes were read."""
    if value is None:
        return None
    return [value.offset, value.size] if isinstance(value, MemberRef) else False


def _records(blob: bytes) -> list[Any]:
    return json.loads(zlib.decompress(blob))


def _unchanged(path: str, before: os.stat_result) -> bool:
    """Whether the file at ``path`` is still the one stat'ed before its scan (so the scan is of it)."""
    try:
        return _identity(os.stat(path)) == _identity(before)
    except OSError:
        return False


def _replay(records: list[Any], path: str, shard: ShardFile, skips: SkipLog, keep_doc: Callable[[dict], bool],
            modalities: Collection[str]) -> Iterator[Undecoded]:
    """What ``ScanCache._scan`` yielded and skipped for these records, in order."""
    for record in records:
        kind = record[0]
        if kind == _SAMPLE:
            _, key, sample_id, label, text, present, refs, content, split = record
            if keep_doc(split_doc(sample_id, content, split)):
                npy = {m: None if r is None else MemberRef(shard, r[0], r[1])
                       for m, r in zip(present, refs, strict=True) if m in modalities}
                yield Undecoded(id=sample_id, key=key, label=label, text=text, modalities=tuple(present), npy=npy,
                                shard=path, content=content)
        elif kind == _SKIP:
            skips.skip(record[1], record[2])
        else:
            _, reason, detail, sample_id, content, split = record
            if keep_doc(split_doc(sample_id, content, split)):
                skips.skip(reason, detail)


def index_shards(paths: Sequence[str], processes: int, *, start: int = 0) -> int:
    """Scan the shards of ``paths`` whose scans are not on disk yet (``ScanCache.wants_scan``), up to
    ``processes`` at once, and write their scans: a loader's workers then replay every shard from the first
    epoch on, instead of each scanning all of them as it goes. ``start``: the place in ``paths`` to begin
    at (the ranks on one machine begin at their own shares, and skip shards another has done meanwhile).
    Returns the number of shards scanned; a failure leaves a shard to the loader's own scan."""
    kept = cache()
    if processes < 2 or kept.folder is None or "fork" not in multiprocessing.get_all_start_methods():
        return 0
    order = [*paths[start:], *paths[:start]]
    todo = [p for p in order if kept.wants_scan(p) is not None]
    if len(todo) < 2:  # one shard: the loader's first epoch scans it as soon
        return 0
    begun = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(min(processes, len(todo))) as pool:
        done = sum(pool.imap_unordered(_index_one, todo))
    log.info("scanned %d of %d shards in %.1f s with %d processes; their scans are kept in %s", done, len(paths),
             time.perf_counter() - begun, min(processes, len(todo)), kept.folder)
    return done


def _index_one(path: str) -> int:
    """(In a pool process) 1 where this process scanned the shard and kept its scan on disk, else 0."""
    try:
        kept = ScanCache(limit=0, folder=cache().folder)
        stat = kept.wants_scan(path)  # another rank may have done it meanwhile
        if stat is None:
            return 0
        for _ in kept._scan(path, stat, SkipLog(quiet=True), lambda _doc: True, ()):
            pass
        return int(kept._load(path, _identity(stat), header_only=True) is not None)
    except Exception:  # noqa: BLE001 - a shard the loader then scans itself, and reports if it is bad
        log.debug("could not scan %s ahead", path, exc_info=True)
        return 0


_CACHE: ScanCache | None = None


def cache() -> ScanCache:
    """This process's cache (created on first use, so that ``MBM_SCAN_CACHE`` and ``MBM_SCAN_DIR`` set before
    it count)."""
    global _CACHE
    if _CACHE is None:
        _CACHE = ScanCache()
    return _CACHE
