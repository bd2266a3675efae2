"""A text extractor for tests that fails on purpose: ``[extract.text] name = "failing-text"``.

A text holding ``config.trigger`` makes a featurize call raise ``config.error``: "MemoryError",
"OutOfMemoryError" (torch.cuda's, which the CPU can raise too), "CudaError" (a RuntimeError as torch
words a failed CUDA call), "ValueError" (a bad input) or "SIGKILL" (the worker process is killed, as
the kernel's out-of-memory killer does) or "SLEEP" (the call never ends: a job to interrupt). "SIGINT" and
"SIGTERM" send the process that signal and go on; "DROPPED_SIGINT" sends SIGINT from a finalizer, where
what its handler raises is dropped (as in a callback from C), and goes on. Other texts give one row of
features per word, each row the word's length. Its module is preloaded by Beam's worker fork server, so spawned
workers know the name too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mbm.extractors.base import Extractor, ExtractorConfig
from mbm.extractors.registry import register_extractor

ERRORS = ("MemoryError", "OutOfMemoryError", "CudaError", "ValueError", "SIGKILL", "SLEEP", "SIGINT", "SIGTERM",
          "DROPPED_SIGINT")


@dataclasses.dataclass(kw_only=True, frozen=True)
class FailingTextConfig(ExtractorConfig):
    trigger: str = "oom"
    error: str = "MemoryError"
    dim: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.error not in ERRORS:
            self._fail("error", f"must be one of {', '.join(ERRORS)}")


def _send(error: str) -> None:
    import signal

    from tests.support.signals import send, send_dropped

    if error == "DROPPED_SIGINT":
        send_dropped()
    else:
        send(getattr(signal, error))


def make_error(name: str) -> BaseException:
    import torch

    if name == "MemoryError":
        return MemoryError()
    if name == "OutOfMemoryError":
        return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.6 GiB total)")
    if name == "CudaError":
        return RuntimeError("CUDA error: an illegal memory access was encountered")
    return ValueError("this text cannot be featurized")


@register_extractor
class FailingTextExtractor(Extractor):
    name = "failing-text"
    modality = "text"
    config_type = FailingTextConfig

    def preload_modules(self) -> list[str]:
        return [__name__]

    @property
    def dim(self) -> int:
        return self.config.dim

    def load(self, device: str) -> Any:
        return "model"

    def featurize(self, model: Any, batch: list, device: str) -> list[np.ndarray]:
        if any(self.config.trigger in text for text in batch):
            if self.config.error == "SIGKILL":
                import os
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
            if self.config.error == "SLEEP":
                import time

                time.sleep(600)
            if self.config.error in ("SIGINT", "SIGTERM", "DROPPED_SIGINT"):
                _send(self.config.error)
            else:
                raise make_error(self.config.error)
        return [np.array([[len(w)] * self.config.dim for w in text.split() or [""]], np.float32) for text in batch]
