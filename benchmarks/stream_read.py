"""The three readers `benchmarks/stream.py` compares over one epoch, and the dataset they read.

- ``mbm_epoch``: the trainer's loader (``StreamLoader`` over ``ShardStream``, the train split's
  config as ``mbm train`` builds it: shuffle buffer, task selection, collate).
- ``wds_epoch``: plain ``webdataset.WebDataset`` with the same decoding (``np.load`` of each .npy,
  ``json.loads``), the same samples (train split, those the task uses), a shuffle buffer of the same size and
  mbm's own ``collate``, so only the reading differs.
- ``tar_epoch``: the tar members' bytes read with ``tarfile`` and nothing else (the I/O bound).

Each returns ``Epoch(seconds, batches, samples)``; ``samples`` counts those in the batches.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from mbm.data.collate import CollateConfig, collate
from mbm.data.decode import Sample
from mbm.data.loader import StreamLoader
from mbm.data.source import DataSource, label_key, resolve_data
from mbm.data.split import sample_split
from mbm.data.stream import ShardStream, StreamConfig
from mbm.data.synthetic import SyntheticConfig, write_synthetic_dataset
from mbm.train.build import model_config, stream_config
from mbm.train.config import TrainConfig

# Realistic feature shapes: MiniLM token features, EfficientNet-Lite0 7x7 patches, log-mel frames.
LENGTHS = {"text": (20, 60), "image": (49, 49), "audio": (100, 400)}
DIMS = {"text": 384, "image": 1280, "audio": 80}


@dataclass
class Epoch:
    seconds: float
    batches: int
    samples: int


def make_dataset(out: str, n: int, per_shard: int, seed: int = 0) -> DataSource:
    """A synthetic dataset in the `mbm preprocess` contract (float16, some modalities missing)."""
    write_synthetic_dataset(out, SyntheticConfig(num_samples=n, samples_per_shard=per_shard, feature_dims=DIMS,
                                                 lengths=LENGTHS, seed=seed))
    return resolve_data(out)


def train_stream(source: DataSource, cfg: TrainConfig) -> StreamConfig:
    """The train split's stream exactly as the trainer builds it for ``cfg.task`` (the modalities its model
    reads; ``cfg.pair`` set for retrieve)."""
    labels = list(source.labels)
    dims = {m: source.feature_dims[m] for m in model_config(cfg, source, labels).input_modalities()}
    return stream_config(cfg, source, labels, dims, "train", train=True)


def mbm_epoch(source: DataSource, cfg: TrainConfig) -> Epoch:
    """One epoch of the trainer's loader with ``cfg.workers`` data-loader workers."""
    loader = StreamLoader(ShardStream(train_stream(source, cfg)), workers=cfg.workers)
    start = time.perf_counter()
    batches = samples = 0
    # One epoch of what ``StreamLoader.__iter__`` repeats forever (the same DataLoader and stream).
    for batch in loader.one_pass():
        batches += 1
        samples += len(batch["ids"])
    seconds = time.perf_counter() - start
    loader.close()  # its workers persist across epochs; this reader measures one
    return Epoch(seconds, batches, samples)


class _Keep:
    """The samples the mbm loader trains on (the rules of ``mbm.data.stream.Selector``, from the json doc):
    this split's samples holding a modality the model reads, with what the task needs: a known label
    (classify), both modalities of the pair (retrieve), a text (generate)."""

    def __init__(self, scfg: StreamConfig) -> None:
        self.split, self.val_fraction, self.split_by, self.task = scfg.split, scfg.val_fraction, scfg.split_by, scfg.task
        self.read, self.pair = set(scfg.collate.feature_dims), set(scfg.pair or ())
        self.labels = {label_key(v) for v in scfg.collate.labels}

    def __call__(self, raw: dict[str, Any]) -> bool:
        doc = raw["doc"] = json.loads(raw["json"])
        present = set(doc.get("modalities") or ())
        if sample_split(doc, self.val_fraction, self.split_by) != self.split or not present & self.read:
            return False
        if self.task == "classify":
            label = doc.get("label")
            return label is not None and label_key(label) in self.labels
        if self.task == "retrieve":
            return self.pair <= present
        return isinstance(doc.get("text"), str) and bool(doc["text"])


class _Decode:
    def __init__(self, dims: dict[str, int]) -> None:
        self.dims = dims

    def __call__(self, raw: dict[str, Any]) -> Sample:
        doc = raw["doc"]
        feats = {m: np.load(io.BytesIO(raw[f"{m}.npy"]), allow_pickle=False)
                 for m in self.dims if f"{m}.npy" in raw}
        text = doc.get("text")
        return Sample(id=doc["id"], key=raw["__key__"], label=doc.get("label"),
                      text=text if isinstance(text, str) else None, features=feats)


class _Collate:
    def __init__(self, cfg: CollateConfig) -> None:
        self.cfg = cfg

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        return collate(samples, self.cfg)


def wds_epoch(source: DataSource, cfg: TrainConfig) -> Epoch:
    """One epoch of plain webdataset (shards split over workers by webdataset itself)."""
    import webdataset as wds

    scfg = train_stream(source, cfg)
    ds = (wds.WebDataset(list(source.shards), shardshuffle=len(source.shards), seed=cfg.seed, empty_check=False)
          .select(_Keep(scfg))
          .map(_Decode(scfg.collate.feature_dims))
          .shuffle(scfg.shuffle_buffer, initial=scfg.shuffle_buffer)
          .batched(scfg.batch_size, collation_fn=_Collate(scfg.collate), partial=False))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=cfg.workers)
    start = time.perf_counter()
    batches = samples = 0
    for batch in loader:
        batches += 1
        samples += len(batch["ids"])
    return Epoch(time.perf_counter() - start, batches, samples)


def tar_epoch(source: DataSource, cfg: TrainConfig) -> Epoch:
    """Every member's bytes of every shard, read once in this process; ``samples`` counts ``.json`` members."""
    start = time.perf_counter()
    samples = 0
    for path in source.shards:
        with tarfile.open(path, mode="r|") as tar:
            for info in tar:
                if info.isreg():
                    tar.extractfile(info).read()
                    samples += info.name.endswith(".json")
    return Epoch(time.perf_counter() - start, 0, samples)


def with_workers(cfg: TrainConfig, workers: int) -> TrainConfig:
    return replace(cfg, workers=workers)


def children_cpu() -> float:
    """CPU seconds of this process's live children (its loader workers), from /proc."""
    from stream_memory import children

    total = 0
    for pid in children(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def environ(**values: str | None) -> Iterator[None]:
    """The environment with ``values`` set (None: unset), as it was again after."""
    saved = {k: os.environ.get(k) for k in values}

    def put(items: dict[str, str | None]) -> None:
        for k, v in items.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    put(values)
    try:
        yield
    finally:
        put(saved)


@contextlib.contextmanager
def no_kept_scans() -> Iterator[None]:
    """``MBM_SCAN_DIR`` an empty temporary folder and no scan in this process's memory, as for a run's first
    epoch on new data (unless scans are off)."""
    import mbm.data.scan as scan

    if os.environ.get("MBM_SCAN_DIR", "").strip().lower() == "off":
        yield
        return
    with tempfile.TemporaryDirectory(prefix="mbm-scans-") as folder, environ(MBM_SCAN_DIR=folder):
        scan._CACHE = None
        try:
            yield
        finally:
            scan._CACHE = None


def persistent_epochs(source: DataSource, cfg: TrainConfig, epochs: int) -> list[tuple[float, float]]:
    """(workers' CPU ms per batch, wall ms per batch) of each of ``epochs`` epochs of one loader whose
    workers live for all of them, as the trainer's do (Linux: read from /proc)."""
    import mbm.data.scan as scan
    from mbm.data.errors import SkipLog

    stream = ShardStream(train_stream(source, cfg))
    # count the batches without leaving scans for the workers to inherit or read from disk
    scan._CACHE = scan.ScanCache(limit=0, folder=None)
    per_epoch = sum(1 for _ in stream.raw_batches(SkipLog(quiet=True)))
    with no_kept_scans():  # each worker starts with none: its first epoch scans, later ones replay
        loader = StreamLoader(stream, workers=cfg.workers)
        out, batches = [], iter(loader)
        for _ in range(epochs):
            cpu, start = children_cpu(), time.perf_counter()
            for _ in range(per_epoch):
                next(batches)
            out.append(((children_cpu() - cpu) / per_epoch * 1e3, (time.perf_counter() - start) / per_epoch * 1e3))
        loader.close()
    return out


def loader_cpu(source: DataSource, cfg: TrainConfig, epochs: int) -> tuple[float, float, float]:
    """CPU ms per batch of the mbm loader over ``epochs`` epochs (after one untimed): (this process,
    its workers, wall). Each epoch's workers exit and are reaped at its end, so ``os.times`` counts them."""
    mbm_epoch(source, cfg)
    before, start = os.times(), time.perf_counter()
    batches = sum(mbm_epoch(source, cfg).batches for _ in range(epochs))
    after, wall = os.times(), time.perf_counter() - start
    main = (after.user - before.user) + (after.system - before.system)
    workers = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return main / batches * 1e3, workers / batches * 1e3, wall / batches * 1e3


def scan_costs(source: DataSource, cfg: TrainConfig, reps: int, folder: str) -> dict[str, Any]:
    """CPU µs per shard sample of the stream's part before decoding (scan, split, select, shuffle, batches) for
    one epoch of the train split, best of ``reps``: scanning every shard, replaying its scans from the files
    in ``folder`` (a fresh process's memory: each rep a new cache), and replaying them from memory."""
    import mbm.data.scan as scan
    from mbm.data.errors import SkipLog

    stream = ShardStream(train_stream(source, cfg))
    n = sum(source.shard_sizes)
    before = scan._CACHE

    def best(make_cache) -> float:
        times = []
        for _ in range(reps):
            scan._CACHE = make_cache()
            start = time.process_time()
            deque(stream.raw_batches(SkipLog(quiet=True)), maxlen=0)
            times.append((time.process_time() - start) / n * 1e6)
        return min(times)

    try:
        scanned = best(lambda: scan.ScanCache(limit=0, folder=None))
        scan._CACHE = scan.ScanCache(limit=0, folder=folder)
        deque(stream.raw_batches(SkipLog(quiet=True)), maxlen=0)  # writes the files
        on_disk = best(lambda: scan.ScanCache(limit=0, folder=folder))
        scan._CACHE = memory = scan.ScanCache(limit=10 * n, folder=None)
        deque(stream.raw_batches(SkipLog(quiet=True)), maxlen=0)
        in_memory = best(lambda: memory)
    finally:
        scan._CACHE = before
    files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".scan")]
    return {"samples": n, "shards": len(source.shards), "scanned_us": scanned, "disk_us": on_disk,
            "memory_us": in_memory, "files": len(files), "bytes_per_sample": sum(map(os.path.getsize, files)) / n}
