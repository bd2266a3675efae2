"""Shared-memory segments that DataLoader workers reuse for their batches.

A fresh segment per batch costs a worker about 4 ms per 6 MB on a 2-core VM: the kernel allocates,
zeroes and maps every page, and frees them again when the training process is done. Each worker
keeps a few segments instead. A segment starts with a 64-byte header of two int64: the sequence
number of the batch the worker wrote into it, and the one the training process released. The
training process copies a batch out (into private or pinned memory) and then releases the segment
by writing its sequence number back; the worker reuses only segments whose two numbers match, and
takes a one-off segment when all of its own are still out, so it never waits and never overwrites
a batch that has not been read.

The handshake relies on x86-64's memory order: a load is never reordered with a later store. The
training process's copy (loads) therefore completes before its release (a store) is visible, and a
worker's read of the header (a load) before it writes the segment again. Weakly ordered CPUs
(arm64) allow both reorderings and Python has no fence to forbid them, so there every batch gets a
one-off segment, as with torch's own sharing.
"""

from __future__ import annotations

import os
import platform

import numpy as np
import torch

HEADER = 64  # bytes before a batch's data in every buffer (written and released sequence numbers)
SLOTS = 4  # segments a worker keeps; a DataLoader holds 2 batches per worker in flight by default
GROWTH = 1.25  # a segment that must grow gets this much headroom for the batches that follow
REUSABLE = platform.machine().lower() in ("x86_64", "amd64")  # see the module docstring


def header(buffer: torch.Tensor) -> np.ndarray:
    """The (written, released) int64 pair at the start of ``buffer``."""
    return buffer.numpy()[:16].view(np.int64)


def new_segment(nbytes: int) -> torch.Tensor:
    """A uint8 tensor over a new shared-memory segment of ``nbytes`` (zero-filled by the kernel)."""
    storage = torch.UntypedStorage._new_shared(max(nbytes, HEADER))
    return torch.empty(0, dtype=torch.uint8).set_(storage)


class SegmentPool:
    """A worker's reusable segments; ``take`` gives one with ``[HEADER, nbytes)`` zeroed."""

    def __init__(self, slots: int = SLOTS) -> None:
        self.limit = slots if REUSABLE else 0
        self.segments: list[torch.Tensor] = []
        self.seq = 0

    def take(self, nbytes: int) -> tuple[torch.Tensor, int | None]:
        """A segment and the sequence number to release it with (None: a one-off segment, freed when dropped)."""
        self.seq += 1
        for i, segment in enumerate(self.segments):
            written, released = header(segment)
            if written != released:
                continue  # still with the training process
            if segment.numel() < nbytes:
                segment = self.segments[i] = new_segment(int(nbytes * GROWTH))
            else:
                segment.numpy()[HEADER:nbytes] = 0
            header(segment)[0] = self.seq
            return segment, self.seq
        if len(self.segments) < self.limit:
            segment = new_segment(int(nbytes * GROWTH))
            self.segments.append(segment)
            header(segment)[0] = self.seq
            return segment, self.seq
        return new_segment(nbytes), None


def copy_out(buffer: torch.Tensor, end: int, seq: int, into: torch.Tensor | None = None) -> torch.Tensor:
    """``buffer[:end]`` copied into private memory (or into ``into``), then the segment released."""
    if header(buffer)[0] != seq:
        raise RuntimeError(f"batch {seq}'s shared memory was reused before it was read (unpack a batch once)")
    out = into if into is not None else torch.from_numpy(np.empty(end, np.uint8))
    np.copyto(out.numpy()[:end], buffer.numpy()[:end])  # numpy: on this thread, no OpenMP pool woken
    header(buffer)[1] = seq  # after the copy's loads (x86-64 order; see the module docstring)
    return out


_POOL: SegmentPool | None = None


def pool() -> SegmentPool:
    """This process's pool (a forked child starts with none of its parent's segments)."""
    global _POOL
    if _POOL is None:
        _POOL = SegmentPool()
    return _POOL


def _forget_pool() -> None:
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool)
