"""Beam ModelHandler around an Extractor: RunInference loads the model once per worker and feeds it batches."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mbm.alloc import tune_malloc
from mbm.extractors.base import Extractor
from mbm.extractors.beam_api import ModelHandler
from mbm.extractors.runtime import check_device, resolve_device
from mbm.resources import usable_cores

log = logging.getLogger(__name__)

# The cores a worker shares with the others: read once per process (every bundle sizes its threads).
_usable_cores = functools.cache(usable_cores)


def configure_threads(*, load_torch: bool = True) -> None:
    """Share the CPU between Beam workers: torch threads = cores // MBM_WORKERS (torch's default when unset),
    the cores this process may use (``mbm.resources.usable_cores``: affinity and cgroup CPU quota).

    Also keeps large blocks in malloc's heap (``mbm.alloc``): without it CPU inference spends most
    of its time in page faults.

    ``load_torch=False`` (a stage that may or may not run torch, such as cleaning) leaves a process
    that has not imported torch without it: ``OMP_NUM_THREADS`` is set instead, which torch's OpenMP
    and MKL read when torch loads, so every thread of the process starts with that many.
    """
    tune_malloc()
    workers = os.environ.get("MBM_WORKERS")
    if not workers:
        return
    try:
        count = int(workers)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"MBM_WORKERS must be a positive integer, got {workers!r}")
    threads = max(1, _usable_cores() // count)
    if not load_torch and "torch" not in sys.modules:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        return
    import torch

    torch.set_num_threads(threads)


FINGERPRINT_BATCH = 32  # the image batch size (pass shape) a plain extractor fingerprint stands for


def features_fingerprint(extractor: Extractor, batch_size: int) -> str:
    """The fingerprint stored with features: the extractor's, plus the pass shape where features depend on it.

    Image passes always run ``batch_size`` rows (``ExtractorHandler.run_inference``), and convolution
    kernels are picked by shape: on the CPU a pass of 1 row gives features ~1e-5 apart from passes of
    2 to 32. So an image batch size other than 32 is part of the fingerprint (a dataset extended with
    another batch size recomputes its images rather than mix the two). Text passes have fixed shapes
    per length and log-mel frames do not depend on the batch: their fingerprints stay the extractor's.
    """
    fingerprint = extractor.fingerprint()
    if extractor.modality != "image" or batch_size == FINGERPRINT_BATCH:
        return fingerprint
    return hashlib.sha256(f"{fingerprint}|image passes of {batch_size}".encode()).hexdigest()


class LoadedModel:
    """What load_model returns: Beam's Shared keeps a weak reference to it, which tuples and dicts refuse."""

    __slots__ = ("model", "device", "__weakref__")

    def __init__(self, model: Any, device: str) -> None:
        self.model = model
        self.device = device


class ExtractorHandler(ModelHandler[Any, np.ndarray, LoadedModel]):
    """Runs `extractor` under RunInference; pickles as the extractor's config, never as a loaded model."""

    def __init__(self, extractor: Extractor, *, batch_size: int = 32, device: str = "auto") -> None:
        if not isinstance(extractor, Extractor):
            raise TypeError(f"ExtractorHandler needs an Extractor, got {type(extractor).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        super().__init__(min_batch_size=1, max_batch_size=batch_size)
        self.extractor = extractor
        self.batch_size = batch_size
        self.device = check_device(device)

    def load_model(self) -> LoadedModel:
        """Resolve the device, size torch's thread pool, and load the extractor's weights."""
        configure_threads()
        device = resolve_device(self.device)
        log.info(
            "loading extractor %s (%s) on %s", self.extractor.name, self.extractor.fingerprint()[:12], device
        )
        return LoadedModel(self.extractor.load(device), device)

    def run_inference(
        self, batch: Sequence[Any], model: LoadedModel, inference_args: dict[str, Any] | None = None
    ) -> list[np.ndarray]:
        """Features for each example of `batch`, in order."""
        self.validate_inference_args(inference_args)
        inputs = list(batch)
        if self.extractor.modality == "image" and 0 < len(inputs) < self.batch_size:
            # Always run full batches: kernels are chosen by shape, so a fixed shape makes every
            # image's features bit-identical however Beam grouped it (padding rows are dropped).
            inputs += [inputs[0]] * (self.batch_size - len(inputs))
        features = self.extractor.featurize(model.model, inputs, model.device)[: len(batch)]
        if len(features) != len(batch):
            raise ValueError(
                f"{self.extractor.name} returned {len(features)} results for {len(batch)} inputs"
            )
        return features

    def pass_keys(self) -> Callable[[Any], tuple[Any, int]]:
        """For batching that fills forward passes: an input's pass-shape key and how many inputs of that
        key fill one pass (the extractor's ``pass_keys``; otherwise ``batch_size`` inputs, which image
        passes always run, fill one)."""
        keys = self.extractor.pass_keys(resolve_device(self.device))
        if keys is not None:
            return keys
        full = (None, self.batch_size)
        return lambda value: full

    def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
        if inference_args:
            raise ValueError(f"extractors take no inference_args, got {sorted(inference_args)}")

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        """Input size for Beam's throughput metrics, without pickling the batch."""
        return sum(x.nbytes if isinstance(x, np.ndarray) else len(str(x).encode()) for x in batch)

    def batch_elements_kwargs(self) -> dict[str, Any]:
        # Full batches from the start: Beam's adaptive sizing would begin at 1 and grow, and every
        # forward pass runs a fixed shape (see run_inference), so small batches only waste compute.
        return {"min_batch_size": self.batch_size, "max_batch_size": self.batch_size}

    def get_metrics_namespace(self) -> str:
        return f"mbm_extract_{self.extractor.modality}"

    def __repr__(self) -> str:
        return f"ExtractorHandler({self.extractor!r}, batch_size={self.batch_size}, device={self.device!r})"
