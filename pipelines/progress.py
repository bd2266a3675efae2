"""Cross-process progress for local runs: workers append counts to files, the driver sums them.

Beam's local runners report metrics only when the pipeline ends; a user preprocessing thousands of
samples wants a live bar. Each worker process writes its running counts to its own small JSON file
in ``<staging>/progress/`` at most every ``interval`` seconds (and when a bundle finishes); the
driver polls the folder. On remote runners the folder is not local and nothing is written.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import apache_beam as beam


class ProgressWriter:
    """Per-process counter flushed to ``dir/<pid>-<uuid>.json``; cheap to call per element."""

    def __init__(self, directory: str, interval: float = 0.5) -> None:
        self._dir = directory
        self._interval = interval
        self._counts: Counter[str] = Counter()
        self._last = time.monotonic()  # first flush after one interval, or at finish_bundle
        self._path: Path | None = None

    def add(self, name: str, n: int = 1) -> None:
        self._counts[name] += n
        now = time.monotonic()
        if now - self._last >= self._interval:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        self._last = now if now is not None else time.monotonic()
        if "://" in self._dir:
            return
        try:
            if self._path is None:
                Path(self._dir).mkdir(parents=True, exist_ok=True)
                self._path = Path(self._dir) / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
            tmp = self._path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._counts))
            os.replace(tmp, self._path)
        except OSError:
            pass  # progress is best effort; never fail a job over it


def read_progress(directory: str) -> Counter[str]:
    total: Counter[str] = Counter()
    for p in Path(directory).glob("*.json"):
        try:
            total.update(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return total


class ProgressMonitor:
    """Driver-side thread that calls ``callback(counts)`` every ``interval`` seconds until stopped."""

    def __init__(self, directory: str, callback, interval: float = 0.5) -> None:
        self._dir = directory
        self._callback = callback
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProgressMonitor:
        if "://" not in self._dir:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        if "://" not in self._dir and Path(self._dir).exists():
            self._callback(read_progress(self._dir))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._callback(read_progress(self._dir))


class CountProgress(beam.DoFn):
    """Passes elements through and counts them under ``name`` for the driver's progress bar."""

    def __init__(self, name: str, directory: str) -> None:
        self._name = name
        self._dir = directory
        self._writer: ProgressWriter | None = None

    def setup(self) -> None:
        self._writer = ProgressWriter(self._dir)

    def process(self, element):
        self._writer.add(self._name)
        yield element

    def finish_bundle(self) -> None:
        self._writer.flush()
