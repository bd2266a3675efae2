"""Shared-memory segments that DataLoader workers reuse for their batches.

A fresh segment per batch costs a worker about 4 ms per 6 MB on a 2-core VM: the kernel allocates,
zeroes and maps every page, and frees them again when the training process is done. Each worker
keeps a few segments instead. A segment starts with a 64-byte header of int64: the sequence number
of the batch the worker wrote into it, the one the training process released, and a flag the worker
sets when it drops the segment for a larger one. The training process copies a batch out (into
private or pinned memory) and then releases the segment by writing its sequence number back; the
worker reuses only segments whose two numbers match, and takes a one-off segment when all of its own
are still out, so it never waits and never overwrites a batch that has not been read.

A segment crosses to the training process once: torch sends a storage as a file descriptor, which
costs a connection to the worker's resource-sharer thread per batch (~0.7 ms of the receiving
thread, most of it waiting, on a 2-core VM) and a new mapping when nothing holds the last one. So
the first batch in a segment carries it with its key (``Key``: the worker's pid, a random token of
its pool, the segment's number), the training process keeps it under that key (``received``), and
later batches in it carry the key alone. The training process drops a segment when the worker
flags it dropped, and a loader drops its workers' segments when it stops them (``forget``).

The handshake relies on x86-64's memory order: a load is never reordered with a later store. The
training process's copy (loads) therefore completes before its release (a store) is visible, and a
worker's read of the header (a load) before it writes the segment again. Weakly ordered CPUs
(arm64) allow both reorderings and Python has no fence to forbid them, so there every batch gets a
one-off segment, as with torch's own sharing.
"""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Iterable

import numpy as np
import torch

Key = tuple[int, int, int]  # (worker pid, its pool's token, segment number)

HEADER = 64  # bytes before a batch's data in every buffer (written and released sequence numbers, dropped flag)
SLOTS = 4  # segments a worker keeps; a DataLoader holds 2 batches per worker in flight by default
GROWTH = 1.25  # a segment that must grow gets this much headroom for the batches that follow
REUSABLE = platform.machine().lower() in ("x86_64", "amd64")  # see the module docstring


def header(buffer: torch.Tensor) -> np.ndarray:
    """The (written, released, dropped) int64s at the start of ``buffer``."""
    return buffer.numpy()[:24].view(np.int64)


def new_segment(nbytes: int) -> torch.Tensor:
    """A uint8 tensor over a new shared-memory segment of ``nbytes`` (zero-filled by the kernel)."""
    storage = torch.UntypedStorage._new_shared(max(nbytes, HEADER))
    return torch.empty(0, dtype=torch.uint8).set_(storage)


class SegmentPool:
    """A worker's reusable segments; ``take`` gives one whose bytes past the header are what an earlier
    batch left there (``pack_collate`` writes all of a batch's tensors)."""

    def __init__(self, slots: int = SLOTS) -> None:
        self.limit = slots if REUSABLE else 0
        self.segments: list[torch.Tensor] = []
        self.keys: list[Key] = []
        self.seq = 0
        self.token = int.from_bytes(os.urandom(8), "little") >> 1
        self.numbered = 0  # segments this pool has made
        self.sent: set[Key] = set()  # keys of the segments the training process has received

    def _new(self, nbytes: int) -> tuple[torch.Tensor, Key]:
        self.numbered += 1
        return new_segment(int(nbytes * GROWTH)), (os.getpid(), self.token, self.numbered)

    def take(self, nbytes: int) -> tuple[torch.Tensor, int | None, Key | None]:
        """A segment, the sequence number to release it with and its key (None, None: a one-off
        segment, freed when dropped)."""
        self.seq += 1
        for i, segment in enumerate(self.segments):
            written, released, _ = header(segment)
            if written != released:
                continue  # still with the training process
            if segment.numel() < nbytes:
                header(segment)[2] = 1  # dropped: the training process lets go of it too
                self.sent.discard(self.keys[i])
                segment, self.keys[i] = self._new(nbytes)
                self.segments[i] = segment
            header(segment)[0] = self.seq
            return segment, self.seq, self.keys[i]
        if len(self.segments) < self.limit:
            segment, key = self._new(nbytes)
            self.segments.append(segment)
            self.keys.append(key)
            header(segment)[0] = self.seq
            return segment, self.seq, key
        return new_segment(nbytes), None, None

    def first_send(self, key: Key) -> bool:
        """Whether a batch in segment ``key`` must carry the segment: not sent yet (then counted as sent
        from now on), or another process's segment."""
        if key[1] != self.token:
            return True
        if key in self.sent:
            return False
        self.sent.add(key)
        return True


# The training process's side: segments received from workers, by key.
_RECEIVED: dict[Key, torch.Tensor] = {}
_RECEIVED_LOCK = threading.Lock()


def receive(key: Key, segment: torch.Tensor) -> None:
    """Keep ``segment``, sent for the first time, under ``key``; let go of those their workers dropped."""
    with _RECEIVED_LOCK:
        for old in [k for k, s in _RECEIVED.items() if header(s)[2]]:
            del _RECEIVED[old]
        _RECEIVED[key] = segment


def received(key: Key) -> torch.Tensor:
    """The segment a worker sent before under ``key``."""
    with _RECEIVED_LOCK:
        segment = _RECEIVED.get(key)
    if segment is None:
        raise RuntimeError(f"a data-loader worker (pid {key[0]}) sent a batch in shared segment {key[2]}, which "
                           "this process has not received or has let go of (a loader closed while its workers ran?)")
    return segment


def forget(pids: Iterable[int]) -> None:
    """Let go of the segments of these workers (stopped, or about to be)."""
    pids = set(pids)
    with _RECEIVED_LOCK:
        for key in [k for k in _RECEIVED if k[0] in pids]:
            del _RECEIVED[key]


def check(buffer: torch.Tensor, seq: int) -> None:
    """Raise unless ``buffer`` still holds batch ``seq`` (not released and reused yet)."""
    if header(buffer)[0] != seq:
        raise RuntimeError(f"batch {seq}'s shared memory was reused before it was read (unpack a batch once)")


def release(buffer: torch.Tensor, seq: int) -> None:
    """Hand the segment back to its worker: batch ``seq`` has been read out of it."""
    header(buffer)[1] = seq  # after the reads' loads (x86-64 order; see the module docstring)


def copy_out(buffer: torch.Tensor, end: int, seq: int, into: torch.Tensor | None = None) -> torch.Tensor:
    """``buffer[:end]`` copied into private memory (or into ``into``), then the segment released."""
    check(buffer, seq)
    out = into if into is not None else torch.from_numpy(np.empty(end, np.uint8))
    np.copyto(out.numpy()[:end], buffer.numpy()[:end])  # numpy: on this thread, no OpenMP pool woken
    release(buffer, seq)
    return out


_POOL: SegmentPool | None = None


def pool() -> SegmentPool:
    """This process's pool (a forked child starts with none of its parent's segments)."""
    global _POOL
    if _POOL is None:
        _POOL = SegmentPool()
    return _POOL


def drop_pool() -> None:
    """Let go of this process's segments (a forked child's start, a worker's end of a held-out pass): the
    next batch takes new ones, under a new token."""
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=drop_pool)
