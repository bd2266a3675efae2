"""Skipped data: counters and rate-limited warnings, so bad data neither crashes a run nor disappears."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

log = logging.getLogger(__name__)


class CorruptSample(ValueError):
    """A sample that cannot be used; ``reason`` is a stable code such as ``npy.bad``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipLog:
    """Counts skipped shards and samples by reason; warns at most once per ``interval`` seconds.

    Each reason is warned about the first time it occurs; later occurrences within ``interval`` are
    counted and summarised in the next warning. ``quiet`` counts without logging (e.g. on all but
    one rank and data-loader worker, which all read the same stream).
    """

    def __init__(self, *, interval: float = 30.0, quiet: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.counts: Counter[str] = Counter()
        self._interval = interval
        self._quiet = quiet
        self._clock = clock
        self._last_warn: float | None = None
        self._seen: set[str] = set()
        self._suppressed = 0

    def skip(self, reason: str, detail: str = "") -> None:
        """Record one skipped item and maybe warn."""
        self.counts[reason] += 1
        if self._quiet:
            return
        now = self._clock()
        first = reason not in self._seen
        if first or self._last_warn is None or now - self._last_warn >= self._interval:
            extra = f" (+{self._suppressed} more skipped since the last warning)" if self._suppressed else ""
            log.warning("skipped %s: %s%s", reason, detail, extra)
            self._seen.add(reason)
            self._last_warn = now
            self._suppressed = 0
        else:
            self._suppressed += 1

    def count(self, reason: str) -> None:
        """Record an expected, silent skip (e.g. a sample without a label under ``classify``)."""
        self.counts[reason] += 1

    def snapshot(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))
