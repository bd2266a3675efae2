"""The extraction transform: one RunInference step per modality over the stream of CleanSamples.

Each step's ModelHandler wraps the modality's ``ExtractorHandler``: a worker loads the model once,
``FillBatches`` batches samples so that they fill the model's forward passes, and only the samples
that carry the modality are featurized; the others pass through. A batch that fails is retried one
sample at a time so a single bad input loses only its own modality, recorded in ``dropped``; a failure
of the machine (out of memory, a failed GPU) is no input's fault and stops the job (``ResourceError``).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from mbm.extractors.beam_api import ModelHandler, RunInference
from pipelines.dedupe import LRUCache, feature_cache
from pipelines.errors import ResourceError, describe, resource_kind
from schemas import MODALITIES, CleanSample, Reject
from schemas.features import all_finite

log = logging.getLogger(__name__)
_LOAD_LOCK = threading.Lock()


class LazyModel:
    """Loads the inner model on first use, so a run with nothing to extract (all samples unchanged,
    or none with this modality) never pays for loading weights. Weak-referenceable, as Beam needs."""

    __slots__ = ("_inner", "_model", "__weakref__")

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._model = None

    def get(self) -> Any:
        if self._model is None:
            # One load at a time per process: bundles may run on several threads, Beam shares the
            # model between them, and concurrent first imports of transformers fail.
            with _LOAD_LOCK:
                if self._model is None:
                    self._model = self._inner.load_model()
        return self._model


# A batch carries at most this many samples without the modality; that many waiting leave on their own.
# Few: they hold decoded media (a 30 s clip is 1.9 MB) and gain nothing from waiting.
MAX_RIDERS = 32


def _featurizes(modality: str, sample: CleanSample) -> bool:
    return getattr(sample, modality) is not None and modality not in sample.reused


class FillBatches(beam.DoFn):
    """Batches for one modality's extraction that fill its forward passes.

    Beam's BatchElements cuts a batch by count, so image passes (always ``batch_size`` rows) ran
    31 images and a copy when others were mixed in, and each batch of texts split into token-length
    buckets whose last pass of each was filled with copies of a row. Here the samples to featurize
    wait in one queue per pass shape (``ModalityHandler.pass_keys``: one for images, one per padded
    token length for text); once ``batch_size`` are waiting, or the waiting samples fill
    ``max(4, batch_size // 32)`` whole passes, a batch takes whole passes of them, up to
    ``batch_size``. The second trigger is for long texts (a 512-token text is a pass of its own): the
    work then follows the input instead of piling up to the end of the bundle, where no idle worker
    can take part of it (``pipelines.runner``). Samples without the modality ride along with the next batch (at most
    ``MAX_RIDERS``; that many leave on their own). With ``[runner] dedupe``, a sample whose input is a copy
    of one waiting (the same content hash) waits with it and leaves in its batch, and one whose features are
    in the worker's cache (``pipelines.dedupe``) rides along: neither takes a row of a pass. Leftovers that
    fill no pass go as they are once ``2 x batch_size`` are waiting, and at the end of the bundle, so
    memory stays bounded. Passes have fixed shapes either way, so features do not depend on the
    batching (but see the README on bfloat16 on a GPU).
    """

    def __init__(self, handler: ModalityHandler) -> None:
        super().__init__()
        self._handler = handler
        self._size = handler.batch_size
        self._passes = max(4, self._size // 32)

    def setup(self) -> None:
        self._keys: Any = None  # loaded with the first sample to featurize (a tokenizer for text)
        self._cache = self._handler.cache()

    def start_bundle(self) -> None:
        self._queues: dict[Any, tuple[int, list[CleanSample]]] = {}
        self._riders: list[CleanSample] = []
        self._waiting = 0
        self._copies: dict[str, list[CleanSample]] = {}  # content hash of a waiting sample -> its copies

    def process(self, sample: CleanSample):
        m = self._handler.modality
        featurizes = _featurizes(m, sample)
        digest = sample.modality_hashes.get(m) if self._cache is not None and featurizes else None
        if digest and digest in self._copies:
            self._copies[digest].append(sample)
            return
        if not featurizes or (digest and digest in self._cache):
            self._riders.append(sample)
            if len(self._riders) >= MAX_RIDERS:
                yield self._batch([])
            return
        if digest:
            self._copies[digest] = []
        if self._keys is None:
            self._keys = self._handler.pass_keys()
        try:
            key, rows = self._keys(getattr(sample, m))
        except Exception:  # noqa: BLE001 - the extractor reports what is wrong with the input, in its batch
            key, rows = None, 1
        queue = self._queues.setdefault(key, (max(1, min(rows, self._size)), []))[1]
        queue.append(sample)
        self._waiting += 1
        while self._waiting >= self._size or self._whole_passes() >= self._passes:
            taken = self._take(True) or (self._take(False) if self._waiting >= 2 * self._size else [])
            if not taken:
                break
            yield self._batch(taken)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows

        while self._waiting or self._riders:
            taken = (self._take(True) or self._take(False)) if self._waiting else []
            yield GlobalWindows.windowed_value_at_end_of_window(self._batch(taken))

    def _whole_passes(self) -> int:
        return sum(len(queue) // rows for rows, queue in self._queues.values())

    def _take(self, whole_passes: bool) -> list[CleanSample]:
        """Up to ``batch_size`` waiting samples, queue by queue: whole passes only, or any."""
        taken: list[CleanSample] = []
        for key in sorted(self._queues, key=repr):
            rows, queue = self._queues[key]
            n = min(len(queue), self._size - len(taken))
            if whole_passes:
                n = n // rows * rows
            taken += queue[:n]
            del queue[:n]
        return taken

    def _batch(self, taken: list[CleanSample]) -> list[CleanSample]:
        self._waiting -= len(taken)
        riders = self._riders[:MAX_RIDERS]
        del self._riders[:len(riders)]
        if self._copies:
            m = self._handler.modality
            taken = [c for s in taken for c in (s, *self._copies.pop(s.modality_hashes.get(m), ()))]
        return taken + riders


def _empty_gpu_cache() -> bool:
    """Give the CUDA caching allocator's unused blocks back to the device; False without CUDA."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return False
    torch.cuda.empty_cache()
    return True


def _resolved(device: str) -> str:
    """The device "auto" stands for here, for messages; the name as it is when that cannot be told."""
    try:
        from mbm.extractors.runtime import resolve_device

        return resolve_device(device)
    except Exception:  # noqa: BLE001 - only a message depends on it
        return device


class ModalityHandler(ModelHandler[CleanSample, CleanSample, Any]):
    """Featurizes one modality of whole CleanSamples with an inner ``ExtractorHandler``."""

    def __init__(self, modality: str, inner: Any, fingerprint: str, dedupe: bool = False) -> None:
        super().__init__()
        self._modality = modality
        self._inner = inner
        self._fingerprint = fingerprint
        self._dedupe = dedupe
        self._run = uuid.uuid4().hex  # the job's: its workers share it, another job's cache is not this one's

    def load_model(self) -> LazyModel:
        return LazyModel(self._inner)

    @property
    def modality(self) -> str:
        return self._modality

    @property
    def batch_size(self) -> int:
        return self._inner.batch_size

    def pass_keys(self) -> Any:
        return self._inner.pass_keys()

    def cache(self) -> LRUCache | None:
        """This worker's features of recent inputs by content hash (``pipelines.dedupe``); None without dedupe."""
        return feature_cache(self._modality, f"{self._fingerprint}:{self._run}") if self._dedupe else None

    def should_skip_batching(self) -> bool:
        return True  # FillBatches batches the samples before RunInference

    def get_metrics_namespace(self) -> str:
        return f"mbm_extract_{self._modality}"

    def get_num_bytes(self, batch: Sequence[CleanSample]) -> int:
        """Bytes of this modality's inputs, for Beam's metrics; the default pickles the whole batch."""
        total = 0
        for s in batch:
            value = getattr(s, self._modality)
            if isinstance(value, np.ndarray):
                total += value.nbytes
            elif isinstance(value, str):
                total += len(value.encode())
        return total

    def run_inference(self, batch: Sequence[CleanSample], model: Any, inference_args=None) -> Iterable[CleanSample]:
        m = self._modality
        todo = [i for i, s in enumerate(batch) if _featurizes(m, s)]
        results: dict[int, np.ndarray | str] = {}
        cache = self.cache() if todo else None
        copies: list[tuple[int, int]] = []  # (sample, the sample in this batch whose features it copies)
        first: dict[str, int] = {}
        if cache is not None:
            todo, copies, first = self._unique(batch, todo, cache, results)
            if results or copies:
                Metrics.counter(self.get_metrics_namespace(), "copies").inc(len(results) + len(copies))
        if todo:
            try:
                model = model.get()
            except Exception as e:  # a model that does not fit is the machine's limit too
                kind = resource_kind(e)
                if kind is None:
                    raise
                raise ResourceError(self._advice(kind, e, "loading its model", None)) from e
            try:
                feats = self._featurize([getattr(batch[i], m) for i in todo], model)
                results.update(zip(todo, feats, strict=True))
            except ResourceError:
                raise
            except Exception:
                log.warning("%s extraction failed for a batch of %d; retrying one by one", m, len(todo), exc_info=True)
                for i in todo:
                    try:
                        results[i] = self._featurize([getattr(batch[i], m)], model)[0]
                    except ResourceError:
                        raise
                    except Exception as e:
                        results[i] = f"extract.{m}: {m}.extract_error: {type(e).__name__}: {e}"
        if cache is not None:
            for digest, i in first.items():  # a row of a batch's array is copied: the rest would stay held
                result = results[i]
                cache.put(digest, result.copy() if isinstance(result, np.ndarray) and result.base is not None else result)
            for i, j in copies:
                results[i] = results[j]
        return [self._attach(s, results.get(i)) for i, s in enumerate(batch)]

    def _unique(self, batch: Sequence[CleanSample], todo: list[int], cache: LRUCache,
                results: dict[int, np.ndarray | str]) -> tuple[list[int], list[tuple[int, int]], dict[str, int]]:
        """``todo`` less the samples whose input is in ``cache`` (their results filled in) or a copy of an
        earlier one in the batch (returned as pairs); the content hash of each sample left, by sample."""
        left: list[int] = []
        copies: list[tuple[int, int]] = []
        first: dict[str, int] = {}
        for i in todo:
            digest = batch[i].modality_hashes.get(self._modality)
            if digest:
                hit = cache.get(digest)
                if hit is not None:
                    results[i] = hit
                    continue
                if digest in first:
                    copies.append((i, first[digest]))
                    continue
                first[digest] = i
            left.append(i)
        return left, copies, first

    def _featurize(self, inputs: list, model: Any) -> list:
        """The inner handler's features; a failure of the machine (memory, the GPU) raises ResourceError,
        which stops the job instead of rejecting samples that are not at fault. Out of GPU memory, the
        allocator's cached blocks are given back and the call is tried once more first."""
        try:
            return self._inner.run_inference(inputs, model)
        except Exception as e:
            kind = resource_kind(e)
            if kind is None:
                raise
            if kind == "GPU memory" and _empty_gpu_cache():
                log.warning("%s extraction ran out of GPU memory for %d input(s); retrying once with the "
                            "allocator's cache emptied", self._modality, len(inputs))
                try:
                    return self._inner.run_inference(inputs, model)
                except Exception as again:
                    if resource_kind(again) is None:
                        raise
                    e = again
            raise ResourceError(self._advice(kind, e, f"featurizing {len(inputs)} input(s)", model)) from e

    def _advice(self, kind: str, e: BaseException, action: str, model: Any) -> str:
        m = self._modality
        inner = self._inner
        name = getattr(getattr(inner, "extractor", None), "name", type(inner).__name__)
        device = getattr(model, "device", None) or _resolved(getattr(inner, "device", "?"))
        workers = os.environ.get("MBM_WORKERS", "?")
        what, detail = describe(kind, e)
        if kind == "GPU":
            fix = 'the GPU is unusable in this process from now on; check the device (nvidia-smi), or run on device = "cpu"'
        elif kind == "disk space":
            fix = "free space on the disk it writes to"
        else:
            fix = (f"run fewer workers ([runner] workers, now {workers}: each holds its own copy of every model) or "
                   f"smaller batches ([extract.{m}] batch_size, now {inner.batch_size})"
                   + (', or on device = "cpu"' if str(device).startswith("cuda") else ""))
        return (f"extract.{m}: {name} on {device} {what} {action} ({detail}); this is the "
                f"machine's limit, not bad data, so the job stops without rejecting samples for it: {fix}")

    def _attach(self, sample: CleanSample, result: np.ndarray | str | None) -> CleanSample:
        m = self._modality
        if result is None:
            if m in sample.reused:  # features come from the previous version's shard, same fingerprint
                return sample.with_(fingerprints={**sample.fingerprints, m: self._fingerprint})
            return sample
        # Decoded pixels and waveforms are dropped once featurized; the cleaned text stays (it goes in the json).
        media = getattr(sample, m) if m == "text" else None
        # A failure records the extractor that failed too: another one (a fixed model, other settings)
        # retries the modality on the next run, where the same one would fail again (cleaning.retried)
        tried = {**sample.fingerprints, m: self._fingerprint}
        if isinstance(result, str):
            return sample.with_(**{m: media}, dropped={**sample.dropped, m: result}, fingerprints=tried)
        if not all_finite(np.asarray(result)):
            return sample.with_(**{m: media}, dropped={**sample.dropped, m: f"extract.{m}: {m}.non_finite_features: "
                                                       "the extractor produced NaN or Inf"}, fingerprints=tried)
        return sample.with_(
            **{m: media},
            features={**sample.features, m: np.ascontiguousarray(result, dtype=np.float16)},
            fingerprints={**sample.fingerprints, m: self._fingerprint},
        )


def _split_failed(sample: CleanSample):
    """Samples that lost every modality in extraction become rejects."""
    if sample.features or sample.reused:
        yield sample
        return
    reasons = [d for m, d in sample.dropped.items() if d.startswith("extract.")]
    first = reasons[0].split(": ") if reasons else ["extract", "extract.no_features", ""]
    yield beam.pvalue.TaggedOutput("rejects", Reject(
        id=sample.id, stage=first[0], reason=first[1] if len(first) > 1 else "extract.error",
        detail="; ".join(sample.dropped.values()), source=sample.source))


class ExtractFeatures(beam.PTransform):
    """CleanSamples → CleanSamples with ``features``; tagged ``rejects`` for those left with none."""

    def __init__(self, handlers: dict[str, ModelHandler]) -> None:
        super().__init__()
        self._handlers = handlers

    def expand(self, samples):
        for modality in MODALITIES:
            if modality in self._handlers:
                handler = self._handlers[modality]
                samples = (samples
                           | f"Batch{modality.title()}" >> beam.ParDo(FillBatches(handler))
                           | f"Extract{modality.title()}" >> RunInference(handler))
        return samples | "SplitFailed" >> beam.FlatMap(_split_failed).with_outputs("rejects", main="samples")


def build_handlers(extractors: dict[str, Any], batch_sizes: dict[str, int], device: str,
                   dedupe: bool = True) -> dict[str, ModalityHandler]:
    """One ModalityHandler per modality around each extractor's ExtractorHandler; ``dedupe``: inputs
    that repeat are featurized once (``pipelines.dedupe``)."""
    from mbm.extractors.handler import ExtractorHandler, features_fingerprint

    return {
        m: ModalityHandler(m, ExtractorHandler(ex, batch_size=batch_sizes[m], device=device),
                           features_fingerprint(ex, batch_sizes[m]), dedupe)
        for m, ex in extractors.items()
    }
