"""A per-process memory of shard scans, so that a long-lived loader worker scans each shard once.

Every data-loader worker scans every shard's headers and json docs each epoch to agree on the sample
order (``mbm.data.stream``): 30-75 µs per sample per worker (faster and slower periods of a 2-core
machine), the same work in every worker and every epoch. Workers live for the whole run, so each keeps
what its scans found: per shard, the checked samples (ids, labels, text, and ``MemberRef``s to their
arrays, never the arrays) and the skips recorded on the way, in their order. A later epoch replays them, skips included, when the shard is
still the same file (device, inode, size, mtime), so the stream and its counters are what a fresh
scan gives. Shards whose arrays were read eagerly (compressed tars) and shards that fail to open are
scanned anew each time. At most ``MBM_SCAN_CACHE`` samples (default 100000: 125-150 MB at the 1.3-1.5 KB
a sample tracemalloc measured on shards mbm preprocess wrote) are kept per process; 0 turns it off.
Past that, every worker scans every epoch again (docs/benchmarks.md, "Where the loader's time goes").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterator
from typing import Any

from mbm.data.decode import Undecoded
from mbm.data.errors import SkipLog
from mbm.data.shards import file_identity, read_shards
from mbm.data.stages import parsed

DEFAULT_LIMIT = 100_000


def _limit() -> int:
    try:
        return max(0, int(os.environ.get("MBM_SCAN_CACHE", DEFAULT_LIMIT)))
    except ValueError:
        return DEFAULT_LIMIT


class _Recorder:
    """Passes skips on to ``skips`` and keeps them, in order, among the samples of ``events``."""

    def __init__(self, skips: SkipLog, events: list[Any]) -> None:
        self.skips, self.events = skips, events

    def skip(self, reason: str, detail: str = "") -> None:
        self.events.append((reason, detail))
        self.skips.skip(reason, detail)


class ScanCache:
    """Scanned shards of this process, keyed by path and by what the scan kept (split, modalities)."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = _limit() if limit is None else limit
        self.size = 0  # samples held
        self.entries: dict[tuple[str, Any], tuple[tuple[int, int, int, int], list[Any]]] = {}

    def samples(self, paths: list[str], skips: SkipLog, keep_doc: Callable[[dict], bool],
                modalities: Collection[str], split: Any) -> Iterator[Undecoded]:
        """``parsed(read_shards(paths, skips, lazy=True), skips, keep_doc, modalities)``, from memory where it can be.

        ``split`` names what ``keep_doc`` keeps (two calls with equal ``split`` must pass the same samples).
        """
        mods = tuple(sorted(modalities))
        for path in paths:
            yield from self._shard(path, skips, keep_doc, mods, (path, split, mods))

    def _shard(self, path: str, skips: SkipLog, keep_doc: Callable[[dict], bool], mods: tuple[str, ...],
               key: tuple[str, Any]) -> Iterator[Undecoded]:
        try:
            identity = file_identity(os.stat(path))
        except OSError:
            identity = None
        hit = self.entries.get(key)
        if hit is not None and hit[0] == identity:
            for event in hit[1]:
                if isinstance(event, Undecoded):
                    yield event
                else:
                    skips.skip(*event)
            return
        if hit is not None:  # the shard changed: forget the old scan
            self.size -= sum(isinstance(e, Undecoded) for e in self.entries.pop(key)[1])
        keep = identity is not None and self.limit > 0
        events: list[Any] = []
        sink = _Recorder(skips, events) if keep else skips
        count = 0
        for sample in parsed(read_shards([path], sink, lazy=True), sink, keep_doc=keep_doc, modalities=mods):
            if keep and any(isinstance(v, bytes) for v in sample.npy.values()):
                keep, events, sink = False, [], skips  # arrays read eagerly (a compressed tar): too big to keep
            if keep:
                events.append(sample)
                count += 1
            yield sample
        # Reached only when the whole shard was read (a consumer that stops early closes the generator above).
        if keep and self.size + count <= self.limit:
            self.entries[key] = (identity, events)
            self.size += count


_CACHE: ScanCache | None = None


def cache() -> ScanCache:
    """This process's cache (created on first use, so that ``MBM_SCAN_CACHE`` set before it counts)."""
    global _CACHE
    if _CACHE is None:
        _CACHE = ScanCache()
    return _CACHE
