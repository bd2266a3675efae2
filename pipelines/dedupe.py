"""Media that repeat within a run are decoded and featurized once (``[runner] dedupe``, on by default).

Caption datasets hold one picture under several captions (COCO and Flickr30k: five each), speech
corpora one clip under several transcripts. A plain pipeline decodes that picture and runs the image
model on it five times for the same features. Here:

- ``GroupByMedia``, after reading: samples are grouped by the media they point at (the image's file or
  tar member, else the audio's), so that the rows of one picture reach one worker one after the other.
  Without it they spread over every worker and the whole run: Beam's local runner deals a shuffle's keys
  out to its workers in turn, other runners by hash. Media bytes a reader holds are spooled on a local
  run, the same bytes once (``pipelines.readers.source._ReadFn``), so copies point at one place and group
  too; without a spool (a remote output folder) a sample holding its media's bytes is not grouped, so
  the bytes never cross one more shuffle.
- ``CleanedCache``: cleaning keeps the last few cleaned values by content hash (the raw bytes and the
  cleaning settings, ``pipelines.cleaning.load_raw``), so a copy is not decoded and resized again.
- ``FeatureCache``: ``FillBatches`` holds a copy back with the sample it copies instead of giving it a
  row of a forward pass, and ``ModalityHandler.run_inference`` featurizes each content hash once and
  keeps the results of recent ones. A copy gets the very features a pass of its own would give: passes
  have fixed shapes, so features do not depend on the batching (``FillBatches``).

The same content hash means the same bytes under the same cleaning settings; two files with the same
bytes share features too, where they meet in a batch or in the cache, grouped or not.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import apache_beam as beam
import numpy as np

from schemas import RawSample, Reject

CLEANED_CACHE_BYTES = 32 * 1024 * 1024  # per worker: a few decoded clips (30 s is 1.9 MB), many images
FEATURE_CACHE_BYTES = 32 * 1024 * 1024  # per worker and modality: ~250 EfficientNet-Lite0 feature maps


def media_key(sample: RawSample | Reject) -> str | None:
    """What groups ``sample`` with its copies: its image's (else its audio's) file and place in it; None
    for media bytes in hand, and for a sample with neither medium (a Reject too)."""
    for m in ("image", "audio"):
        media = getattr(sample, m, None)
        if media is None:
            continue
        if media.uri is None:
            return None
        where = f":{media.offset}:{media.size}" if media.offset is not None else ""
        return f"{m}:{media.uri}{where}"
    return None




# Samples of one group that stay together; the rest are spread over the workers again. One element of the
# grouped output is one worker's: a placeholder picture under half of a dataset's rows would otherwise put
# all of those rows, and their texts' extraction, on one worker. Spread, each worker featurizes the picture
# once and finds it in its cache after.
GROUP_MAX = 64
_SPREAD = "spread"


def _ungroup(group: tuple[str, Any]) -> Any:
    for i, sample in enumerate(group[1]):
        yield sample if i < GROUP_MAX else beam.pvalue.TaggedOutput(_SPREAD, sample)


class GroupByMedia(beam.PTransform):
    """``(media key, sample)`` pairs → the samples, those of one key one after the other on one worker (up
    to ``GROUP_MAX`` of them; the others anywhere). The samples are whatever the caller sends: the read
    step sends where each lies in its spool (``pipelines.readers.source``), ~100 bytes, as Beam's local
    runner holds a shuffle in the driver."""

    def expand(self, keyed):
        grouped = (keyed
                   | "GroupByMedia" >> beam.GroupByKey()
                   | "Ungroup" >> beam.FlatMap(_ungroup).with_outputs(_SPREAD, main="grouped"))
        spread = grouped[_SPREAD] | "Spread" >> beam.Reshuffle()
        return (grouped.grouped, spread) | "Together" >> beam.Flatten()


def nbytes(value: Any) -> int:
    """Memory a cached value holds, roughly: an array's bytes, a string's length, else a little."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, str):
        return len(value)
    return 64


class LRUCache:
    """Values by key, the least recently used dropped beyond ``max_bytes``; thread-safe (a worker may
    run bundles on several threads)."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return default
            self._items.move_to_end(key)
            return item[0]

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: str, value: Any) -> None:
        size = nbytes(value)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self._max:
                return
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self._max:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped


_FEATURES: dict[str, LRUCache] = {}
_FEATURES_LOCK = threading.Lock()


def feature_cache(modality: str, scope: str) -> LRUCache:
    """This process's cache of ``modality`` features (or failures) by content hash for one job's extractor
    (``scope``: its fingerprint and the job's run), shared by ``FillBatches`` and ``ModalityHandler`` of
    that modality. A job run in-process after another (one worker) starts with an empty cache, and the
    other's is dropped: each job's copies are its own input's."""
    key = f"{modality}:{scope}"
    with _FEATURES_LOCK:
        cache = _FEATURES.get(key)
        if cache is None:
            for old in [k for k in _FEATURES if k.startswith(f"{modality}:")]:
                del _FEATURES[old]
            cache = _FEATURES[key] = LRUCache(FEATURE_CACHE_BYTES)
        return cache


def cleaned_cache() -> LRUCache:
    """A cache of cleaned values (or the CleanError a value raised) by content hash, for one cleaning step."""
    return LRUCache(CLEANED_CACHE_BYTES)
