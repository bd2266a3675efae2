"""Skipped data: counters and rate-limited warnings, so bad data neither crashes a run nor disappears."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

#: What a task's skip reason means, for messages (``skip_reasons``)
SKIP_HINTS = {
    "task.no_label": "samples without a label (classify needs one)",
    "task.unknown_label": "labels the run's vocabulary does not hold",
    "task.no_text": "samples without text (generate predicts the text)",
    "task.no_used_modality": "samples with none of the modalities this model reads",
    "task.pair_missing": "samples lacking one of the two retrieval modalities",
}


def skip_reasons(counts: dict[str, int], reads: Iterable[str] = (), task: str = "") -> str:
    """``'N what they are (reason); ...'`` for a split's skip counts. ``reads``: the modalities the
    model reads, named where samples had none of them (for generate: what it predicts the text from)."""
    reads = list(reads)

    def hint(reason: str, n: int) -> str:
        if reason not in SKIP_HINTS:  # a data reason (npy.bad, ...): its code says it
            return reason
        text = SKIP_HINTS[reason]
        if n == 1:  # "samples without ..." / "labels the run's ..." of one
            first, _, rest = text.partition(" ")
            text = f"{first.removesuffix('s')} {rest}"
        if reason == "task.no_used_modality" and reads:
            text = f"{text} ({', '.join(reads)})"
            if task == "generate":
                text += ": generate predicts a sample's text from these, so it needs samples that have them"
        return f"{text} ({reason})"

    return "; ".join(f"{n} {hint(r, n)}" for r, n in counts.items())


def in_shard(shard: str | None, detail: str) -> str:
    """A skipped sample's ``detail`` with the shard it is in, where known."""
    return f"{shard}: {detail}" if shard else detail


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
