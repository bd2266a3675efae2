"""Errors of the job's stages: ``CleanError`` for bad data (the caller turns it into a Reject, never a
crash) and ``ResourceError`` for a machine that cannot run the job as set up (the job stops, and no
sample is rejected for it)."""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from contextlib import contextmanager


class CleanError(ValueError):
    """Bad input found while reading or cleaning one modality of one sample.

    ``reason`` is a stable code (``image.truncated``, ``audio.non_finite``, ``text.invalid_utf8``)
    used to group rejects in reports; ``detail`` says what exactly was wrong.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail or reason


class ResourceError(RuntimeError):
    """A worker ran out of memory, or its GPU failed: the machine's fault, not the sample's.

    Its message is one line; the driver finds it in the text of the failure Beam reports from a
    worker process (``resource_failure``) and stops the job with it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left on the device, disk quota exceeded

# What torch says when the GPU fails (the CUDA context is then unusable: every later call fails too)
_GPU_FAILURE = re.compile(r"CUDA error|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|CUDA driver error|NCCL error")
# The kernel's out-of-memory killer sends SIGKILL; torch then says this of a data-loader worker
_LOADER_KILLED = re.compile(r"DataLoader worker \(pid.*\) is killed by signal: Killed")
# torch's CPU allocator raises a RuntimeError, not MemoryError, when malloc fails
_HOST_ALLOC = re.compile(r"DefaultCPUAllocator: (can't allocate memory|not enough memory)")


def disk_full(e: BaseException) -> OSError | None:
    """The full-disk (or quota) OSError that ``e`` is, or that it was raised from or while handling:
    torch.save, for one, turns a failed write into "RuntimeError: [enforce fail at inline_container.cc]"."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return e
        e = e.__cause__ or e.__context__
    return None


def resource_kind(e: BaseException) -> str | None:
    """"host memory", "GPU memory", "GPU" or "disk space" when ``e`` is the machine's failure, else None
    (the input's)."""
    if isinstance(e, MemoryError):
        return "host memory"
    if disk_full(e) is not None:
        return "disk space"
    name = type(e).__name__
    text = str(e)
    if isinstance(e, RuntimeError) and (_LOADER_KILLED.search(text) or _HOST_ALLOC.search(text)):
        return "host memory"  # a SIGKILLed loader worker (the OOM killer), or a failed allocation
    if name == "OutOfMemoryError" or "CUDA out of memory" in text:  # torch.cuda.OutOfMemoryError
        return "GPU memory"
    if name == "AcceleratorError" or (isinstance(e, RuntimeError) and _GPU_FAILURE.search(text)):
        return "GPU"
    return None


def describe(kind: str, e: BaseException) -> tuple[str, str]:
    """For a failure of ``kind`` (``resource_kind``): what happened ("ran out of GPU memory", "failed")
    and the exception in one short line."""
    what = "failed" if kind == "GPU" else f"ran out of {kind}"
    e = (disk_full(e) or e) if kind == "disk space" else e
    return what, " ".join(f"{type(e).__name__}: {e}".split()).removesuffix(":")[:300]


class DatasetDamaged(ResourceError):
    """The current version's files are not what it wrote (a shard deleted, cut short or replaced by hand):
    no input's fault either, so the job stops with one line, as for a ``ResourceError``."""


_MARK = re.compile(r"(?:ResourceError|DatasetDamaged): (.+?)(?: \[while running '[^']*'\])*\s*$", re.MULTILINE)


def resource_failure(e: BaseException) -> str | None:
    """The message of a ``ResourceError`` behind ``e``: raised here, chained, or quoted in the text of
    the error Beam reports for a worker process."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ResourceError):
            return str(e).split(" [while running", 1)[0]
        found = _MARK.findall(str(e))
        if found:
            return found[-1]
        e = e.__cause__ or e.__context__
    return None


@contextmanager
def disk_guard(what: str, where: str) -> Iterator[None]:
    """A full disk (or quota) while ``what`` in ``where`` raises ``ResourceError`` saying so."""
    try:
        yield
    except OSError as e:
        if resource_kind(e) != "disk space":
            raise
        raise ResourceError(f"{what}: no space left in {where} ({e.strerror}); the job stops and commits "
                            "nothing: free space there, or give [output] dir on a disk with room") from e
