"""The extraction transform: one RunInference step per modality over the stream of CleanSamples.

Each step's ModelHandler wraps the modality's ``ExtractorHandler``: a worker loads the model once,
Beam batches samples, and only the samples that carry the modality are featurized; the others pass
through. A batch that fails is retried one sample at a time so a single bad input loses only its
own modality, recorded in ``dropped``.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import numpy as np

from mbm.extractors.beam_api import ModelHandler, RunInference
from schemas import MODALITIES, CleanSample, Reject

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


FEATURIZE_WEIGHT = 8  # batch weight of a sample with the modality to featurize; any other sample weighs 1


def _weight(modality: str, sample: CleanSample) -> int:
    return FEATURIZE_WEIGHT if getattr(sample, modality) is not None and modality not in sample.reused else 1


class ModalityHandler(ModelHandler[CleanSample, CleanSample, Any]):
    """Featurizes one modality of whole CleanSamples with an inner ``ExtractorHandler``."""

    def __init__(self, modality: str, inner: Any, fingerprint: str) -> None:
        super().__init__()
        self._modality = modality
        self._inner = inner
        self._fingerprint = fingerprint

    def load_model(self) -> LazyModel:
        return LazyModel(self._inner)

    def batch_elements_kwargs(self):
        """Batches of up to ``batch_size`` samples that carry this modality, plus a few that do not.

        Beam counts every sample towards a batch, so a batch of 32 samples of which 24 carry an
        image would run an image pass padded to 32. Weighted instead: a sample to featurize counts
        ``FEATURIZE_WEIGHT``, any other 1, against ``FEATURIZE_WEIGHT x (batch_size + 1) - 1``; a batch holds at
        most ``batch_size`` samples to featurize (all of them when fewer than ``FEATURIZE_WEIGHT`` others
        are mixed in) and at most that many samples in all when the modality is rare.
        """
        kwargs = dict(self._inner.batch_elements_kwargs())
        for key in ("min_batch_size", "max_batch_size"):
            if key in kwargs:
                kwargs[key] = FEATURIZE_WEIGHT * (kwargs[key] + 1) - 1
        kwargs["element_size_fn"] = functools.partial(_weight, self._modality)
        return kwargs

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
        todo = [i for i, s in enumerate(batch) if getattr(s, m) is not None and m not in s.reused]
        results: dict[int, np.ndarray | str] = {}
        if todo:
            model = model.get()
            try:
                feats = self._inner.run_inference([getattr(batch[i], m) for i in todo], model)
                results = dict(zip(todo, feats, strict=True))
            except Exception:
                log.warning("%s extraction failed for a batch of %d; retrying one by one", m, len(todo), exc_info=True)
                for i in todo:
                    try:
                        results[i] = self._inner.run_inference([getattr(batch[i], m)], model)[0]
                    except Exception as e:
                        results[i] = f"extract.{m}: {m}.extract_error: {type(e).__name__}: {e}"
        return [self._attach(s, results.get(i)) for i, s in enumerate(batch)]

    def _attach(self, sample: CleanSample, result: np.ndarray | str | None) -> CleanSample:
        m = self._modality
        if result is None:
            if m in sample.reused:  # features come from the previous version's shard, same fingerprint
                return sample.with_(fingerprints={**sample.fingerprints, m: self._fingerprint})
            return sample
        # Decoded pixels and waveforms are dropped once featurized; the cleaned text stays (it goes in the json).
        media = getattr(sample, m) if m == "text" else None
        if isinstance(result, str):
            return sample.with_(**{m: media}, dropped={**sample.dropped, m: result})
        if not np.isfinite(result).all():
            return sample.with_(**{m: media}, dropped={**sample.dropped, m: f"extract.{m}: {m}.non_finite_features: "
                                                       "the extractor produced NaN or Inf"})
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
                samples = samples | f"Extract{modality.title()}" >> RunInference(self._handlers[modality])
        return samples | "SplitFailed" >> beam.FlatMap(_split_failed).with_outputs("rejects", main="samples")


def build_handlers(extractors: dict[str, Any], batch_sizes: dict[str, int], device: str) -> dict[str, ModalityHandler]:
    """One ModalityHandler per modality around each extractor's ExtractorHandler."""
    from mbm.extractors.handler import ExtractorHandler, features_fingerprint

    return {
        m: ModalityHandler(m, ExtractorHandler(ex, batch_size=batch_sizes[m], device=device),
                           features_fingerprint(ex, batch_sizes[m]))
        for m, ex in extractors.items()
    }
