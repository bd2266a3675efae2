"""``ShardStream``: an IterableDataset of collated batches whose order is fixed by (seed, epoch, rank, world).

Pipeline (every rank and every data-loader worker runs the stream part whole, scanning every shard, or
replaying a kept scan of it: ``mbm.data.scan``):

    shards (shuffled per epoch) → raw samples → json doc (corrupt: skip + count) → this split's ids
    → select (task, from the doc alone) → shuffle buffer (arrays still in the shard) → rank slice
    (groups of world size) → batches → this worker's batches → read + decode arrays (corrupt:
    dropped + counted) → collate (a worker: into a reused shared-memory segment, see ``PackedBatch``)

Splitting at sample level after a global, seeded shuffle makes ranks disjoint and equally sized
even when the dataset is a single shard; the price is that each rank scans all shards. Everything up
to the batches needs only the tar headers and json docs, so it is cheap; the arrays are read and
decoded only by the worker that owns the batch. Workers take batches round-robin (batch i goes to worker i mod W), which is the
order in which the DataLoader returns them, so the batch sequence is the same for any number of
workers. A sample with corrupt arrays leaves a shorter batch; a batch left with no sample is not
yielded (under a DataLoader worker a marker takes its place, so that the round-robin order holds).
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from mbm.data.collate import TASKS, CollateConfig, PackedBatch, pack_collate
from mbm.data.decode import Sample, Undecoded
from mbm.data.errors import CorruptSample, SkipLog
from mbm.data.scan import cache as scan_cache
from mbm.data.source import label_key
from mbm.data.split import EVAL_SPLITS, SPLIT_BY, sample_split
from mbm.data.stages import batched, decoded, epoch_rng, rank_slice, selected, settled, shard_order, shuffled

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    shards: tuple[str, ...]
    collate: CollateConfig
    task: str = "classify"
    split: str = "train"  # "train" | "val" | "test" (``test_apart``) | "all" (every sample: evaluate, generate)
    val_fraction: float = 0.1
    # or a modality: samples with the same content of it share a split (``split_key``); or "split": the
    # dataset's own, where a sample's metadata names it (``named_split``)
    split_by: str = "id"
    # with split_by "split": the dataset names both a validation and a test split, so the test split is kept
    # apart ("test") instead of held out with the validation split (``mbm.data.split.holds_test_apart``)
    test_apart: bool = False
    pair: tuple[str, str] | None = None  # retrieve: both modalities required
    batch_size: int = 32
    shuffle: bool = True
    shuffle_buffer: int = 500
    drop_last: bool = True
    seed: int = 0
    max_samples: int | None = None  # cap per epoch (before the rank split), e.g. for evaluation
    # predicting (mbm generate, mbm predict): samples are used without what training needs of them besides
    # their inputs: generate's text, classify's label, and retrieve's second modality of the pair
    targets_optional: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.split not in EVAL_SPLITS:
            raise ValueError(f"--split must be one of {', '.join(EVAL_SPLITS)}, got {self.split!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.split_by not in SPLIT_BY:
            raise ValueError(f"--split-by must be one of {', '.join(SPLIT_BY)}, got {self.split_by!r}")
        if self.split == "test" and (self.split_by != "split" or not self.test_apart):
            raise ValueError("--split test needs --split-by split on a dataset naming both a validation and a test "
                             "split; otherwise the test samples are part of the held-out split (--split val)")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.task == "retrieve" and (self.pair is None or len(set(self.pair)) != 2):
            raise ValueError(f"--pair needs two different modalities for retrieve, got {self.pair}")


class Selector:
    """Which samples a split and task use, judged from the json doc; misfits are counted under a reason (picklable)."""

    def __init__(self, cfg: StreamConfig) -> None:
        self.cfg = cfg
        self.label_keys = {label_key(v) for v in cfg.collate.labels}
        self._known: dict[tuple[type, Any], bool] = {}  # (type, label) -> in the vocabulary: str, int, bool labels

    def known_label(self, label: Any) -> bool:
        """Whether ``label`` is in the run's vocabulary (``label_key`` is a json dump: remembered per string, int
        and bool label; floats are not, as 0.0 and -0.0 are equal and dump differently)."""
        kind = type(label)
        if kind not in (str, int, bool):
            return label_key(label) in self.label_keys
        hit = self._known.get((kind, label))
        if hit is None:
            hit = label_key(label) in self.label_keys
            if len(self._known) < 10_000:  # a vocabulary of many labels is not remembered whole
                self._known[(kind, label)] = hit
        return hit

    def in_split(self, doc: dict) -> bool:
        cfg = self.cfg
        return cfg.split == "all" or sample_split(doc, cfg.val_fraction, cfg.split_by, cfg.test_apart) == cfg.split

    def __call__(self, s: Undecoded, skips: SkipLog) -> bool:
        cfg = self.cfg
        if not any(m in cfg.collate.feature_dims for m in s.modalities):
            skips.count("task.no_used_modality")
            return False
        if cfg.task == "classify" and not cfg.targets_optional:
            if s.label is None:
                skips.count("task.no_label")
                return False
            if not self.known_label(s.label):
                skips.count("task.unknown_label")
                return False
        elif cfg.task == "retrieve" and not cfg.targets_optional:
            if not all(m in s.modalities for m in cfg.pair):
                skips.count("task.pair_missing")
                return False
        elif cfg.task == "generate" and not s.text and not cfg.targets_optional:
            skips.count("task.no_text")
            return False
        return True


class ShardStream(IterableDataset):
    """Batches of one epoch for one rank, starting after ``skip_batches`` already-consumed batches."""

    def __init__(self, cfg: StreamConfig, *, rank: int = 0, world: int = 1, epoch: int = 0,
                 skip_batches: int = 0) -> None:
        super().__init__()
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.cfg, self.rank, self.world = cfg, rank, world
        self.epoch, self.skip_batches = epoch, skip_batches

    def at(self, epoch: int, skip_batches: int = 0) -> ShardStream:
        """The same stream at another position."""
        return ShardStream(self.cfg, rank=self.rank, world=self.world, epoch=epoch, skip_batches=skip_batches)

    def raw_batches(self, skips: SkipLog) -> Iterator[list[Undecoded]]:
        """This rank's batches of the epoch, arrays not decoded yet, all of them (nothing skipped yet)."""
        cfg = self.cfg
        shards = shard_order(list(cfg.shards), cfg.seed, self.epoch) if cfg.shuffle else list(cfg.shards)
        select = Selector(cfg)
        # Each shard scanned once: later epochs, workers, ranks and runs replay its scan (``mbm.data.scan``).
        samples = scan_cache().samples(shards, skips, select.in_split, cfg.collate.feature_dims,
                                       split=(cfg.split, cfg.val_fraction, cfg.split_by, cfg.test_apart))
        samples = selected(samples, select, skips)
        if cfg.max_samples is not None:
            samples = itertools.islice(samples, cfg.max_samples)
        if cfg.shuffle and cfg.shuffle_buffer > 1:
            samples = shuffled(samples, cfg.shuffle_buffer, epoch_rng(cfg.seed, self.epoch, "samples"))
        # a stream that keeps its last partial batch (evaluation) keeps every sample over the ranks too
        return batched(rank_slice(samples, self.rank, self.world, whole=not cfg.drop_last), cfg.batch_size,
                       cfg.drop_last)

    def sample_batches(self, skips: SkipLog) -> Iterator[list[Sample]]:
        """This rank's batches of decoded samples, all of them; corrupt samples and empty batches left out."""
        for batch in self.raw_batches(skips):
            samples = decoded(batch, self.cfg.collate.feature_dims, skips)
            if samples:
                yield samples

    def batches(self, *, markers: bool = False) -> Iterator[dict[str, Any] | PackedBatch]:
        """This worker's collated batches; with ``markers``, a batch whose samples were all corrupt comes as
        ``{"dropped": n, "ids": []}`` (plus position and counters) instead of being left out, and the pass
        ends with ``{"end": True, "ids": []}`` and this worker's final counters (samples skipped after its
        last batch included). A worker's end marker follows its last batch, so in the DataLoader's
        round-robin order every batch still comes in its place.

        Every batch carries ``position`` (epoch, index) and ``skipped``: this worker's id, the stream's
        counters (the same in every worker) and this worker's decode counters (its own batches only).
        """
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream_skips = SkipLog(quiet=self.rank != 0 or worker != 0)
        decode_skips = SkipLog()  # one process decodes each sample, so each may warn
        self._skip_logs = (stream_skips, decode_skips)
        collate = self.cfg.collate
        in_place = {m: collate.max_tokens.get(m) for m in collate.feature_dims}
        for i, raw in enumerate(self.raw_batches(stream_skips)):
            if i < self.skip_batches or (i - self.skip_batches) % workers != worker:
                continue
            batch = None
            samples = decoded(raw, collate.feature_dims, decode_skips, in_place)
            if samples:
                try:
                    batch = pack_collate(samples, collate, shared=info is not None)
                except CorruptSample:  # an array read into place is corrupt: read those arrays as decode does
                    samples = settled(samples, collate.feature_dims, decode_skips)
                    batch = pack_collate(samples, collate, shared=info is not None) if samples else None
            extras = {"position": (self.epoch, i),
                      "skipped": {"worker": worker, "stream": stream_skips.snapshot(),
                                  "decode": decode_skips.snapshot()}}
            if batch is None:
                log.warning("epoch %d, batch %d: all %d samples corrupt; the batch is dropped", self.epoch, i, len(raw))
                if markers:
                    yield {"dropped": len(raw), "ids": [], **extras}
                continue
            batch.extras.update(extras)
            # A worker sends the packed batch (one shared-memory segment); ``StreamLoader`` unpacks it.
            yield batch if info is not None else batch.unpack()
        if markers:
            yield {"end": True, "ids": [],
                   "skipped": {"worker": worker, "stream": stream_skips.snapshot(), "decode": decode_skips.snapshot()}}

    def skipped(self) -> dict[str, int]:
        """What the last pass over this stream (in this process) skipped, by reason."""
        total: Counter[str] = Counter()
        for skips in getattr(self, "_skip_logs", ()):
            total.update(skips.counts)
        return dict(sorted(total.items()))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Under a DataLoader worker, a left-out batch would shift the round-robin order: send a marker.
        return self.batches(markers=get_worker_info() is not None)
