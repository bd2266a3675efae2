"""Batches to a CUDA device straight from the workers' shared segments (``MBM_LOADER_FEED=registered``).

The default hand-over (``pinned``) has DataLoader's pin thread copy each batch out of its worker's
segment into page-locked memory, and the step copy that to the device. On an H200 with the GPU
benchmark's batches (256 samples, ~60 MB of float16 features) the training process's share of a
batch was ~22 ms against a 16 ms step (``docs/benchmarks.md``); after the segment changes most of
what remains of it on the CPU is that copy.

A worker's reused segments cross to the training process once and stay mapped there
(``mbm.data.segments``), so ``RegisteredFeed`` page-locks each of them once (``cudaHostRegister``) and
copies every batch to the device from where its worker wrote it: the copies run on a side stream, the
step's stream waits for them, and the segment goes back to its worker only once they are done (a CUDA
event). A batch in a one-off segment (all of its worker's were out), or in a segment the driver would
not lock, takes the copy path. Opt-in until measured on a GPU; the device operations sit behind
``CudaCopies`` so the bookkeeping is tested on the CPU.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Protocol

import torch

from mbm.data import segments
from mbm.data.collate import PackedBatch, batch_to, map_tensors

log = logging.getLogger(__name__)

FEEDS = ("pinned", "registered")  # MBM_LOADER_FEED values


def feed_from_env(value: str | None) -> str:
    """The loader feed ``MBM_LOADER_FEED`` names (``pinned`` when unset); a clear error for anything else."""
    feed = (value or "pinned").strip().lower()
    if feed not in FEEDS:
        raise ValueError(f"MBM_LOADER_FEED={value!r}: use one of {', '.join(FEEDS)} (pinned is the default)")
    return feed


class Copies(Protocol):
    """The device operations ``RegisteredFeed`` needs."""

    def lock(self, segment: torch.Tensor) -> bool: ...  # page-lock a segment; False: refused

    def unlock(self, segment: torch.Tensor) -> None: ...

    def copy(self, batch: dict[str, Any]) -> tuple[dict[str, Any], Any]: ...  # (moved batch, completion token)

    def move(self, batch: dict[str, Any]) -> dict[str, Any]: ...  # a batch in private memory, moved at once

    def done(self, token: Any) -> bool: ...  # the copies behind ``token`` have finished reading host memory

    def wait(self, token: Any) -> None: ...


class CudaCopies:
    """``Copies`` on a CUDA device: ``cudaHostRegister``, a side stream and events."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.cudart = torch.cuda.cudart()

    def lock(self, segment: torch.Tensor) -> bool:
        err = int(self.cudart.cudaHostRegister(segment.data_ptr(), segment.numel(), 0))
        if err:
            self._take_error()
            log.warning("cudaHostRegister of a %d-byte loader segment failed (cudaError %d); its batches are "
                        "copied through pinned memory instead", segment.numel(), err)
        return err == 0

    def unlock(self, segment: torch.Tensor) -> None:
        if int(self.cudart.cudaHostUnregister(segment.data_ptr())):
            self._take_error()

    def _take_error(self) -> None:
        """Take the error a failed runtime call left as this thread's last CUDA error. Torch's binding
        returns it and leaves it there, and torch checks the last error after every kernel launch
        (``cudaGetLastError``), so the step's next operation would raise it as its own. A launch here
        takes it (torch has no binding of ``cudaGetLastError``)."""
        try:
            torch.ones(1, device=self.device).add_(1)
        except RuntimeError as e:
            log.debug("took the pending CUDA error: %s", e)

    def copy(self, batch: dict[str, Any]) -> tuple[dict[str, Any], torch.cuda.Event]:
        step = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            moved = batch_to(batch, self.device)
            done = torch.cuda.Event()
            done.record(self.stream)
        step.wait_event(done)
        map_tensors(moved, lambda t: t.record_stream(step))  # allocated on the side stream, used and freed on the step's
        return moved, done

    def move(self, batch: dict[str, Any]) -> dict[str, Any]:
        return batch_to(batch, self.device)

    def done(self, token: torch.cuda.Event) -> bool:
        return token.query()

    def wait(self, token: torch.cuda.Event) -> None:
        token.synchronize()


class RegisteredFeed:
    """Turns what DataLoader workers send into batch dicts on the device (see the module docstring)."""

    def __init__(self, device: torch.device, copies: Copies | None = None) -> None:
        self.copies = copies if copies is not None else CudaCopies(device)
        self.locked: dict[segments.Key, tuple[torch.Tensor, bool]] = {}  # key → (segment, page-locked?)
        self.pending: deque[tuple[Any, torch.Tensor, int]] = deque()  # (token, segment, seq), in copy order

    def __call__(self, packed: PackedBatch) -> dict[str, Any]:
        self._release_done()
        if packed.key is None or packed.seq is None or not self._locked(packed.key, packed.buffer):
            return self.copies.move(packed.unpack())
        segments.check(packed.buffer, packed.seq)
        moved, token = self.copies.copy(packed.views(packed.buffer))
        self.pending.append((token, packed.buffer, packed.seq))
        return moved

    def _locked(self, key: segments.Key, segment: torch.Tensor) -> bool:
        if key not in self.locked:
            self._unlock_dropped()
            self.locked[key] = segment, self.copies.lock(segment)
        return self.locked[key][1]

    def _release_done(self) -> None:
        """Give back the segments whose copies have finished (a stream's work completes in order)."""
        while self.pending and self.copies.done(self.pending[0][0]):
            _, segment, seq = self.pending.popleft()
            segments.release(segment, seq)

    def _unlock_dropped(self) -> None:
        """Unlock the segments their workers dropped for bigger ones (none of their copies is pending:
        a worker drops only a segment it got back)."""
        for key in [k for k, (s, _) in self.locked.items() if segments.header(s)[2]]:
            segment, locked = self.locked.pop(key)
            if locked:
                self.copies.unlock(segment)

    def close(self) -> None:
        """Wait for the pending copies, give their segments back and unlock every segment."""
        while self.pending:
            token, segment, seq = self.pending.popleft()
            self.copies.wait(token)
            segments.release(segment, seq)
        for segment, locked in self.locked.values():
            if locked:
                self.copies.unlock(segment)
        self.locked.clear()
