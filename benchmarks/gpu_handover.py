"""Where the training process's share of each loader batch goes: a probe for the GPU benchmark's train part.

While a ``HandOver`` window is open it times, per batch, what the training process does with what
the DataLoader workers send:

- ``receive``: rebuilding each batch's shared segment from its file descriptor (torch's
  ``rebuild_storage_fd``: a connection to the worker's resource sharer, then a cache lookup, or a
  ``mmap`` when the segment is not mapped here yet; ``mapped`` counts those);
- ``pin``: ``PackedBatch.pin_memory`` in the DataLoader's pin thread (CUDA runs), of which ``pin_alloc``
  is the page-locked buffer (torch's caching host allocator) and ``copy`` the copy out of the segment;
- ``unpack``: ``PackedBatch.unpack`` (on the CPU this is where the copy out happens);
- with ``MBM_LOADER_FEED=registered``: ``feed``, the main thread's whole hand-over of a batch
  (``RegisteredFeed``), of which ``lock`` is page-locking a segment the first time it arrives;

and the CPU seconds of every thread of the process over the window, by thread name (``pt_data_pin``
is the pin thread; the main thread carries the process's name). A pin thread near 100 % of the window
is busy; one far below it while batches are late waits (for the GIL, or for the workers).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Any

HZ = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[int, tuple[str, float]]:
    """Thread id → (name, CPU seconds so far) for every thread of this process, from /proc."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # ended meanwhile
        name = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / HZ)
    return out


class HandOver:
    """Context manager: patch the hand-over's steps with timers; ``summary(batches)`` reports them."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._undo: list[tuple[Any, str, Any]] = []

    def _add(self, key: str, dt: float) -> None:
        with self._lock:
            self.seconds[key] += dt
            self.calls[key] += 1

    def _wrap(self, owner: Any, name: str, key: str) -> None:
        real = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self._add(key, time.perf_counter() - start)

        self._undo.append((owner, name, real))
        setattr(owner, name, timed)

    def __enter__(self) -> HandOver:
        import torch
        import torch.multiprocessing.reductions as reductions

        from mbm.data import feed, segments
        from mbm.data.collate import PackedBatch

        cache = reductions.storage_from_cache

        def counted(cls: Any, key: Any) -> Any:
            found = cache(cls, key)
            if found is None:
                self._add("mapped", 0.0)
            return found

        self._undo.append((reductions, "storage_from_cache", cache))
        reductions.storage_from_cache = counted
        self._wrap(reductions, "rebuild_storage_fd", "receive")
        self._wrap(PackedBatch, "pin_memory", "pin")
        self._wrap(PackedBatch, "unpack", "unpack")
        self._wrap(segments, "copy_out", "copy")
        self._wrap(feed.RegisteredFeed, "__call__", "feed")
        self._wrap(feed.CudaCopies, "lock", "lock")
        empty = torch.empty

        def pinned_empty(*args: Any, pin_memory: bool = False, **kwargs: Any) -> Any:
            if not pin_memory:
                return empty(*args, **kwargs)
            start = time.perf_counter()
            try:
                return empty(*args, pin_memory=True, **kwargs)
            finally:
                self._add("pin_alloc", time.perf_counter() - start)

        self._undo.append((torch, "empty", empty))
        torch.empty = pinned_empty
        self._cpu0 = thread_cpu()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        self._cpu1 = thread_cpu()
        for owner, name, real in reversed(self._undo):
            setattr(owner, name, real)
        self._undo.clear()

    def summary(self, batches: int) -> dict[str, Any]:
        """ms per batch of each timed step, segments mapped, and the threads' CPU share of the window."""
        per = max(batches, 1)
        out: dict[str, Any] = {"batches": batches,
                               "ms_per_batch": {k: round(1e3 * v / per, 2) for k, v in sorted(self.seconds.items())
                                                if k != "mapped"},
                               "segments_mapped": self.calls["mapped"]}
        threads: Counter[str] = Counter()
        for tid, (name, cpu) in self._cpu1.items():
            threads[name] += cpu - self._cpu0.get(tid, (name, 0.0))[1]
        out["thread_cpu_share"] = {name: round(cpu / self.wall, 3) for name, cpu in threads.most_common()
                                   if cpu / self.wall >= 0.01}
        return out

    def line(self, batches: int) -> str:
        s = self.summary(batches)
        steps = ", ".join(f"{k} {v:.2f}" for k, v in s["ms_per_batch"].items())
        threads = ", ".join(f"{k} {100 * v:.0f} %" for k, v in s["thread_cpu_share"].items())
        return (f"    hand-over ms per batch: {steps or 'nothing timed'}; {s['segments_mapped']} segment(s) mapped; "
                f"threads' CPU: {threads}")
