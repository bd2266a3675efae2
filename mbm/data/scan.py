"""Shard scans kept, in this process and on disk, so that a shard's headers and json docs are read once.

Every data-loader worker of every rank reads every shard's tar headers and json docs to agree on the
sample order (``mbm.data.stream``): 75-80 µs a sample on a 2-core machine, the same work in every worker,
every rank and every epoch, which capped the loader's throughput on large datasets (docs/benchmarks.md,
"Where the loader's time goes"). What a scan finds is small: per sample its key, id, label, text,
modalities, the offset and size of each array in the shard, its content hashes and the split its metadata
names, and the skips met on the way, in order. It is kept

- on disk, one file per shard in ``MBM_SCAN_DIR`` (default ``$XDG_CACHE_HOME/mbm/scan``, else
  ``~/.cache/mbm/scan``; ``off``: none), as compressed json records for every split alike (the split is
  chosen as they are replayed), 40-60 bytes a sample on shards ``mbm preprocess`` wrote. Every worker,
  rank and later run (and ``mbm evaluate``) reads it instead of scanning the shard again. Files are written
  whole and renamed into place, so processes scanning the same shard at once each leave a complete one.
  Files no process wrote or read for 30 days are deleted (``mbm.scanfiles.prune``, at most once a day, by a
  process writing a scan), and ``mbm gc`` deletes those of the shards it deletes; the folder can be
  deleted at any time;
- in this process, as the samples one split of the shard gave, ready to be yielded again (1.3-1.5 KB a
  sample, tracemalloc on shards mbm preprocess wrote), for up to ``MBM_SCAN_CACHE`` samples (default
  100000; 0: none).

A loader with two or more workers first has the shards without a kept scan scanned in parallel
(``index_shards``; not for a few thousand samples), so that its workers replay every shard from their
first epoch on.

Either is replayed only while the shard is the same file (size, mtime, ctime, inode), and gives exactly the
samples and skips a fresh scan gives, in order. The stream's whole part before decoding takes 75-85 µs a
sample scanning, 14-15 replaying the records on disk and 4.5 replaying the samples in memory
(``benchmarks/stream.py --scan``). A shard written less than 2 s before its scan began (or whose times
were set then) could be written again without its identity changing (a timestamp tick is a few ms here,
2 s on some file systems), so its scan is not written to disk; a later epoch's is. Shards whose arrays
are read eagerly (compressed tars) and shards that fail to open are scanned anew each time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

from mbm.data.decode import Undecoded, content_hashes, parse_doc, undecoded
from mbm.data.errors import CorruptSample, SkipLog, in_shard
from mbm.data.shards import COMPRESSED, MemberRef, ShardFile, read_shards
from mbm.data.split import meta_split, split_doc
from mbm.scanfiles import DAY, env_folder, prune, scan_file

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 100_000
FORMAT = 1  # of the files in MBM_SCAN_DIR; another number is read as no file
# records: a sample, a skip whatever the split, a sample whose doc is unusable (a skip in its split only)
_SAMPLE, _SKIP, _BAD = 0, 1, 2
_ENV = object()
# a shard's scan is written to disk only when the shard was last written this long before the scan began
_SETTLED = 2_000_000_000
# fewer samples than this left to scan (as the first shard's count projects them): no processes started
POOL_SAMPLES = 5000


def _limit() -> int:
    try:
        return max(0, int(os.environ.get("MBM_SCAN_CACHE", DEFAULT_LIMIT)))
    except ValueError:
        return DEFAULT_LIMIT


def _identity(stat: os.stat_result) -> list[int]:
    """(size, mtime, ctime, inode): a shard rewritten or replaced has another. The status-change time moves
    with every write and no tool sets it back: a shard rewritten in place with its size and mtime kept
    (``cp -p`` over it) is scanned again. The device is left out: a network file system's differs between
    the machines that share the folder."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _changed_at(stat: os.stat_result) -> int:
    """When the shard was last written, or its times set (ns)."""
    return max(stat.st_mtime_ns, stat.st_ctime_ns)


class _Recorder:
    """Passes skips on to ``skips`` and, while ``events`` is a list, records them there in order, as ``record``
    makes them."""

    def __init__(self, skips: SkipLog | _Recorder, events: list[Any] | None,
                 record: Callable[[str, str], Any]) -> None:
        self.skips, self.events, self.record = skips, events, record

    def skip(self, reason: str, detail: str = "") -> None:
        if self.events is not None:
            self.events.append(self.record(reason, detail))
        self.skips.skip(reason, detail)


class ScanCache:
    """This process's scans, and those kept in ``folder`` by every process.

    In memory: the samples one split of a shard gave (``Undecoded``, ready to yield again, 1.3-1.5 KB a sample)
    and its skips, by (path, split, modalities), up to ``limit`` samples. On disk: the shard's compact records
    for every split, by path."""

    def __init__(self, limit: int | None = None, folder: Any = _ENV) -> None:
        self.limit = _limit() if limit is None else limit
        self.folder: str | None = env_folder() if folder is _ENV else folder
        self.size = 0  # samples held in memory
        self.entries: dict[tuple[str, Any, tuple[str, ...]], tuple[list[int], list[Any], int]] = {}
        self._pruned = False

    def samples(self, paths: list[str], skips: SkipLog, keep_doc: Callable[[dict], bool],
                modalities: Collection[str], split: Any) -> Iterator[Undecoded]:
        """``parsed(read_shards(paths, skips, lazy=True), skips, keep_doc, modalities)``, from a kept scan where
        there is one. ``keep_doc`` (a split) reads only what ``split_doc`` keeps of a doc; ``split`` names it
        (two calls with equal ``split`` must pass the same samples)."""
        mods = tuple(sorted(modalities))
        for path in paths:
            yield from self._shard(path, skips, keep_doc, mods, (path, split, mods))

    def _shard(self, path: str, skips: SkipLog, keep_doc: Callable[[dict], bool], mods: tuple[str, ...],
               key: tuple[str, Any, tuple[str, ...]]) -> Iterator[Undecoded]:
        try:
            stat = os.stat(path)
        except OSError:
            stat = None
        identity = _identity(stat) if stat is not None else None
        hit = self.entries.get(key)
        if hit is not None and hit[0] == identity:
            for event in hit[1]:
                if isinstance(event, Undecoded):
                    yield event
                else:
                    skips.skip(*event)
            return
        if hit is not None:  # the shard changed: forget the old scan
            self.size -= self.entries.pop(key)[2]
        keep = identity is not None and self.limit > 0
        events: list[Any] = []
        sink = _Recorder(skips, events if keep else None, lambda reason, detail: (reason, detail))
        records = self._on_disk(path, identity) if identity is not None else None
        found = (_replay(records, path, ShardFile(path, stat), sink, keep_doc, mods) if records is not None
                 else self._scan(path, stat, sink, keep_doc, mods))
        count = 0
        for sample in found:
            if keep and any(isinstance(v, bytes) for v in sample.npy.values()):
                keep, events, sink.events = False, [], None  # arrays read eagerly (a compressed tar): too big to keep
            if keep:
                events.append(sample)
                count += 1
            yield sample
        # Reached only when the whole shard was read (a consumer that stops early closes the generator above).
        if keep and self.size + count <= self.limit:
            self.entries[key] = (identity, events, count)
            self.size += count

    def _scan(self, path: str, stat: os.stat_result | None, skips: SkipLog | _Recorder,
              keep_doc: Callable[[dict], bool], modalities: Collection[str]) -> Iterator[Undecoded]:
        """A fresh scan of the shard, recorded as it goes; written to disk once the whole shard is read."""
        keep = stat is not None and self.folder is not None
        sink = _Recorder(skips, [] if keep else None, lambda reason, detail: [_SKIP, reason, detail])
        started = time.time_ns()
        count = 0
        for raw in read_shards([path], sink, lazy=True):
            url = raw.get("__url__")
            try:
                doc = parse_doc(raw)
            except CorruptSample as exn:
                sink.skip(exn.reason, in_shard(url, exn.detail))
                continue
            try:
                sample = undecoded(raw, doc)
            except CorruptSample as exn:
                detail, hashes, split = in_shard(url, exn.detail), content_hashes(doc), meta_split(doc)
                if sink.events is not None:
                    sink.events.append([_BAD, exn.reason, detail, doc["id"], hashes, split])
                if keep_doc(split_doc(doc["id"], hashes, split)):
                    skips.skip(exn.reason, detail)
                continue
            if sink.events is not None:
                refs = [_ref(v) for v in sample.npy.values()]
                if any(r is False for r in refs):  # arrays read eagerly (a compressed tar): too big to keep
                    sink.events = None
                else:
                    sink.events.append([_SAMPLE, sample.key, sample.id, sample.label, sample.text,
                                        list(sample.modalities), refs, sample.content, sample.split])
                    count += 1
            if keep_doc(split_doc(sample.id, sample.content, sample.split)):
                sample.npy = {m: v for m, v in sample.npy.items() if m in modalities}
                yield sample
        # Reached only when the whole shard was read (a consumer that stops early closes the generator above).
        # A file written less than a timestamp tick before the scan could be written again with the same
        # identity: such a scan is not written (as a racily clean file in git's index).
        if sink.events is not None and _changed_at(stat) <= started - _SETTLED and _unchanged(path, stat):
            blob = zlib.compress(json.dumps(sink.events, separators=(",", ":")).encode("ascii"), 1)
            self._save(path, _identity(stat), blob, count)

    def _on_disk(self, path: str, identity: list[int]) -> list[Any] | None:
        """The shard's records from its file, where they are of this very file."""
        loaded = self._load(path, identity)
        if loaded is None:
            return None
        try:
            return _records(loaded[0])
        except (zlib.error, ValueError):
            return None

    def file(self, path: str) -> str:
        """Where the scan of the shard at ``path`` is kept on disk (``folder`` must be set)."""
        return scan_file(self.folder, path)

    def _load(self, path: str, identity: list[int], *, header_only: bool = False) -> tuple[bytes, int] | None:
        """(records, samples) of the shard's file where it is a scan of this very shard; with ``header_only``,
        the records are not read (b"")."""
        if self.folder is None:
            return None
        try:
            with open(self.file(path), "rb") as f:
                head, _, blob = (f.readline(), b"", b"") if header_only else f.read().partition(b"\n")
                header = json.loads(head)
                if (not isinstance(header, dict) or header.get("format") != FORMAT or header.get("path") != path
                        or header.get("identity") != identity or not isinstance(count := header.get("samples"), int)):
                    return None
                if not header_only and time.time() - os.fstat(f.fileno()).st_mtime > DAY:
                    os.utime(f.fileno())  # in use: its mtime says so to ``prune``
        except (OSError, ValueError):
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
        if (magic.startswith(COMPRESSED) or _changed_at(stat) > time.time_ns() - _SETTLED
                or self._load(path, _identity(stat), header_only=True) is not None):
            return None
        return stat

    def _save(self, path: str, identity: list[int], blob: bytes, count: int) -> None:
        header = json.dumps({"format": FORMAT, "path": path, "identity": identity, "samples": count})
        tmp = None
        try:
            os.makedirs(self.folder, exist_ok=True)
            if not self._pruned:
                self._pruned = True
                prune(self.folder)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(header.encode("ascii") + b"\n" + blob)
            os.replace(tmp, self.file(path))
            tmp = None
        except OSError as exn:
            _cannot_write(self.folder, exn)
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


_WARNED: set[str] = set()  # folders this process (or the one it was forked from) said it cannot write to


def _cannot_write(folder: str, exn: OSError) -> None:
    if folder not in _WARNED:
        _WARNED.add(folder)
        log.warning("cannot keep shard scans in %s (%s): every loader process scans each shard again, every epoch "
                    "past MBM_SCAN_CACHE samples; set MBM_SCAN_DIR to a writable folder (or to off)", folder, exn)


def _writable(folder: str) -> bool:
    """Whether scans can be written to ``folder`` (created if missing); says so once where not."""
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"no write permission on {folder}")
    except OSError as exn:
        _cannot_write(folder, exn)
        return False
    return True


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
                                shard=path, content=content, split=split)
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

    The first shard is scanned in this process; where the shards left look like fewer than ``POOL_SAMPLES``
    samples (by the first one's count), they are left to the workers, whose scans of a small dataset take
    less than starting the processes (about 50 ms). Returns the number of shards scanned; a failure leaves a
    shard to the loader's own scan."""
    kept = cache()
    if processes < 2 or kept.folder is None or "fork" not in multiprocessing.get_all_start_methods():
        return 0
    if not _writable(kept.folder):  # said once here, so the workers forked next do not say it again
        return 0
    order = [*paths[start:], *paths[:start]]
    todo = [p for p in order if kept.wants_scan(p) is not None]
    if len(todo) < 2:  # one shard: the loader's first epoch scans it as soon
        return 0
    begun = time.perf_counter()
    first = _index_one(todo[0])
    rest = todo[1:]
    if first is None or first * len(rest) < POOL_SAMPLES:
        return int(first is not None)
    pool = multiprocessing.get_context("fork").Pool(min(processes, len(rest)), initializer=_pool_signals)
    try:
        done = 1 + sum(n is not None for n in pool.imap_unordered(_index_one, rest))
        pool.close()  # the processes leave once the queue is empty
        pool.join()
    finally:
        pool.terminate()  # interrupted: stop them (no-op once joined)
    log.info("scanned %d of %d shards in %.1f s with %d processes; their scans are kept in %s", done, len(paths),
             time.perf_counter() - begun, min(processes, len(rest)), kept.folder)
    return done


def _pool_signals() -> None:
    """A pool process ends quietly when the pool stops it, and leaves Ctrl-C to the process that started it
    (it inherits that process's handlers, which may raise)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _index_one(path: str) -> int | None:
    """The samples of the shard where this process scanned it and kept its scan on disk, else None."""
    try:
        kept = ScanCache(limit=0, folder=cache().folder)
        stat = kept.wants_scan(path)  # another rank may have done it meanwhile
        if stat is None:
            return None
        deque(kept._scan(path, stat, SkipLog(quiet=True), lambda _doc: True, ()), maxlen=0)  # written as it ends
        loaded = kept._load(path, _identity(stat), header_only=True)
        return None if loaded is None else loaded[1]
    except Exception:  # noqa: BLE001 - a shard the loader then scans itself, and reports if it is bad
        log.debug("could not scan %s ahead", path, exc_info=True)
        return None


_CACHE: ScanCache | None = None


def cache() -> ScanCache:
    """This process's cache (created on first use, so that ``MBM_SCAN_CACHE`` and ``MBM_SCAN_DIR`` set before
    it count)."""
    global _CACHE
    if _CACHE is None:
        _CACHE = ScanCache()
    return _CACHE
